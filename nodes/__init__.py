"""ComfyUI adapters: one module per node family (edlora_nodes, fusion_nodes, regional_nodes) plus the
glue they share (layerwise: layer-wise conditioning transport; lora_patch: ED-LoRA -> ComfyUI LoRA patches)."""
