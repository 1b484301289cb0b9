"""Mix-of-Show for ComfyUI: ED-LoRA loading, layer-wise (P+) conditioning, gradient fusion and
regional multi-concept sampling. Each node family lives in one module of ``nodes/``; a family whose
import fails is logged and skipped so the rest of the pack still loads."""
import importlib
import logging

log = logging.getLogger("mixofshow")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./js"
_FAMILIES = ("edlora_nodes", "fusion_nodes", "regional_nodes")

try:
    from .nodes.edlora_nodes import register_model_folder

    register_model_folder()
except Exception:  # noqa: BLE001 - never take ComfyUI down with us
    log.exception("Mix-of-Show: could not register the models/edloras folder")

for _family in _FAMILIES:
    try:
        _module = importlib.import_module(f".nodes.{_family}", __name__)
    except Exception:  # noqa: BLE001
        log.exception("Mix-of-Show: node family %s failed to import and is skipped", _family)
        continue
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
