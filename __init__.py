"""Mix-of-Show for ComfyUI: ED-LoRA loading, layer-wise (P+) conditioning, gradient fusion and
regional multi-concept sampling, as ComfyUI V3 nodes.

Each node family lives in one module of ``nodes/`` and lists its nodes in ``NODES``; a family whose
import fails is logged and skipped so the rest of the pack (and ComfyUI) still loads. No
``NODE_CLASS_MAPPINGS`` here: ComfyUI would then ignore ``comfy_entrypoint``."""
import importlib
import logging

log = logging.getLogger("mixofshow")

WEB_DIRECTORY = "./js"
FAMILIES = ("edlora_nodes", "fusion_nodes", "region_nodes", "sampling_nodes", "editor_nodes", "train_nodes")


def _load_families() -> list:
    nodes = []
    try:
        from .nodes.glue.folders import register_model_folder
        from .nodes.glue.routes import register_routes

        register_model_folder()
        register_routes()
    except Exception:  # noqa: BLE001 - never take ComfyUI down with us
        log.exception("Mix-of-Show: could not register the models/edloras folder or the web UI's routes")
    for family in FAMILIES:
        try:
            module = importlib.import_module(f".nodes.{family}", __name__)
        except Exception:  # noqa: BLE001
            log.exception("Mix-of-Show: node family %s failed to import and is skipped", family)
            continue
        nodes.extend(module.NODES)
    return nodes


async def comfy_entrypoint():
    """The pack's ``ComfyExtension`` (imported here: the package is also imported outside ComfyUI, e.g.
    by pytest, where ``comfy_api`` does not exist)."""
    from comfy_api.latest import ComfyExtension

    class MixOfShowExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return _load_families()

    return MixOfShowExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
