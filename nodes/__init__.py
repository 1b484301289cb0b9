"""ComfyUI adapters. Node families, one module each with a ``NODES`` list: ``edlora_nodes`` (loaders),
``region_nodes``, ``sampling_nodes``, ``fusion_nodes``; ``common`` holds what they share (socket types,
categories, the V3 base class). The glue behind them: ``layerwise`` (layer-wise conditioning transport),
``lora_patch`` (ED-LoRA -> ComfyUI LoRA patches), ``regions`` (what a region is), ``regional_attention``
(the attention patches of regional sampling)."""
