"""Every name the pack shares with ComfyUI and the browser, in one place: socket types, categories, the
models folder, environment variables, keys in ``model_options`` / ``transformer_options`` / conditioning
dicts / tensors, wrapper keys, UI message keys and HTTP routes. (Node ids live on their node classes and in
``js/lib/names.js``; they never change once released.)"""
from __future__ import annotations

from comfy_api.latest import io

# ---- sockets between the pack's nodes
CONCEPTS = io.Custom("EDLORA_CONCEPTS")   # fusion.prompts.concepts.ConceptSet
REGIONS = io.Custom("MIXOFSHOW_REGIONS")  # tuple of nodes.glue.regions.Region

# ---- categories
CATEGORY = "Mix-of-Show"
LOADERS = f"{CATEGORY}/loaders"
REGIONS_CATEGORY = f"{CATEGORY}/regions"
FUSION = f"{CATEGORY}/fusion"
SAMPLING = f"{CATEGORY}/sampling"

# ---- files
EDLORA_FOLDER = "edloras"                 # models/edloras (and extra_model_paths.yaml's "edloras:")
EDLORA_EXTENSIONS = frozenset({".pth", ".pt", ".safetensors"})
CACHE_ENV = "MIXOFSHOW_FUSION_CACHE"      # folder of the fusion cache (default models/edloras/.fusion_cache)
CACHE_MAX_ENV = "MIXOFSHOW_FUSION_CACHE_MAX_MB"
PREVIEW_PREFIX = "mixofshow_regions"      # temp images of region previews
MAX_FUSION_SIZE = 2 ** 11                 # pixels: the largest width/height Gradient Fusion records at

# ---- keys on ComfyUI's objects
LAYERWISE_KEY = "mixofshow_layerwise"     # transformer_options: the [B, L, T, C] stack of the UNet call
CONCEPTS_USED_KEY = "mixofshow_concepts"  # conditioning dict / model_options: the ED-LoRAs a prompt used / a MODEL has
PROMPT_KEY = "mixofshow_prompt"           # conditioning dict: the prompt text (labels in region previews)
BOX_ATTR = "mixofshow_box"                # attribute of a MASK made from a box: (top, left, bottom, right)
LAYERWISE_WRAPPER = "mixofshow.layerwise"  # DIFFUSION_MODEL wrapper keys
REGIONAL_WRAPPER = "mixofshow.regional"
SEARCH_ALIASES_ATTR = "mixofshow_search_aliases"

# ---- what the browser reads
UI_CONCEPT_SET = "concept_set"            # a loader's concept set, described
UI_CANVAS = "mixofshow_canvas"            # the Regions Editor's canvas size after a run
ROUTE_TOKENS = "/mixofshow/tokens"
ROUTE_POSE_BOXES = "/mixofshow/pose_boxes"
ROUTE_POSES = "/mixofshow/poses/{name}"
