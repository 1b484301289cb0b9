"""ComfyUI adapters (docs/design.md §1.5). Node families, one module each with node classes only and a ``NODES``
list: ``edlora_nodes`` (loaders), ``fusion_nodes``, ``region_nodes``, ``sampling_nodes``, ``editor_nodes``;
``names`` holds every name shared with ComfyUI and the browser; the glue behind the nodes is in ``glue/``."""
