"""ED-LoRA training, the parts that need no ComfyUI (docs/design.md §14).

* :mod:`.dataset` — the training set, its augmentation (resize, crop, paste on the canvas, latent-size
  masks), captions (``<TOK>``, shuffled pieces, templates) and the order of examples;
* :mod:`.objectives` — the masked denoising loss, the attention with captured token maps and the attention
  regulariser;
* :mod:`.schedule` — the linear learning-rate decay and the embedding-norm stop rule;
* :mod:`.settings` — every training setting, the presets that reproduce the reference configurations, the
  concept and initialiser tokens, the trainable modules of a family and the LoRA factors' initialisation.

The training loop inside ComfyUI is ``nodes/glue/training.py``.
"""
