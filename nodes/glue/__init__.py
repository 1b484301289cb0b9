"""What the node classes stand on inside ComfyUI: patches, wrappers, recorders, routes and folder registration.

* ``schema`` — the V3 node base class and schema helpers; ``folders`` — models/edloras and output paths;
* ``family`` — which model family a MODEL / CLIP is; ``loading`` and ``lora_patch`` — concepts onto clones of
  MODEL and CLIP through ComfyUI's own LoRA key maps;
* ``layerwise`` — encoding concept prompts and handing each cross-attention layer its context;
* ``regions``, ``regional`` and ``sampling`` — regions, the one object that runs a regional sampling, the
  samplers; ``previews`` and ``images`` — region previews and the pictures they read;
* ``fusion_run``, ``fusion_recording`` and ``fused_patches`` — one gradient fusion, its recordings, its
  result as LoRA patches and bundles;
* ``routes`` — the HTTP routes of the web UI.
"""
