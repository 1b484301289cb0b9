"""The fusion cache's key, for the tests (moved out of the pack, whose fusion computes it inside ``fuse``)."""
from __future__ import annotations


def cache_key(env, model, clip, concepts, settings) -> str:
    """The cache key a fusion of ``concepts`` on this MODEL/CLIP with ``settings`` is stored under (``env``: the
    in-process ComfyUI of comfy_env, with the pack loaded)."""
    run = env.pack("nodes.glue.fusion_run")
    return run._identity(model, clip, concepts, settings, run.plan_for(model, clip, concepts))[1]
