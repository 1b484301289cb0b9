"""TEST FIXTURE node pack (never shipped to users): tiny random models with SD1.5's and SDXL's exact layouts and
key names, so graphs in tests need no checkpoint download."""
from . import tiny_sd15, tiny_sdxl

_CACHE = {}


class TinySD15Loader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet": (["narrow", "wide", "mini"],),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, unet, seed):
        key = (unet, seed)
        if key not in _CACHE:
            _CACHE[key] = tiny_sd15.build_all(unet, seed)
        return _CACHE[key]


class TinySDXLLoader:
    """The tiny SDXL-layout model (tiny_sdxl.py), and the families the pack refuses at the same size."""
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet": (["narrow", "refiner", "ssd1b", "sd2"],),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, unet, seed):
        key = ("sdxl", unet, seed)
        if key not in _CACHE:
            _CACHE[key] = tiny_sdxl.build_all(unet, seed)
        return _CACHE[key]


# SD1.5's 16 cross-attention blocks (written out here, not imported from the pack).
_ATTN2_BLOCKS = [("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", n) for n in range(3, 12)]
ATTN2_CALLS = []  # one (block, key tokens, value tokens) per call of the stand-in replace


class StandInAttn2Replace:
    """What an IPAdapter-like pack installs: an attn2 replace that computes the attention itself and adds
    its own term (here a constant ``bias``); it records every call."""

    def __init__(self, bias):
        self.bias = bias

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        ATTN2_CALLS.append((tuple(extra_options["block"]), k.shape[1], v.shape[1]))
        return optimized_attention(q, k, v, extra_options["n_heads"]) + self.bias


class StandInAttn2ReplaceNode:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "bias": ("FLOAT", {"default": 0.0, "min": -100, "max": 100})}}

    def patch(self, model, bias):
        patched = model.clone()
        replace = StandInAttn2Replace(bias)
        for kind, number in _ATTN2_BLOCKS:
            patched.set_model_attn2_replace(replace, kind, number, 0)  # keyed with the depth index, as IPAdapter
        return (patched,)


NODE_CLASS_MAPPINGS = {"TinySD15Loader": TinySD15Loader, "TinySDXLLoader": TinySDXLLoader,
                       "StandInAttn2Replace": StandInAttn2ReplaceNode}


def _count_hooks(root) -> dict:
    modules = list(root.modules())
    return {"forward_hooks": sum(len(m._forward_hooks) for m in modules),
            "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in modules)}


class ModelStateProbe:
    """Reports what is attached to a MODEL's and a CLIP's torch modules and patchers (forward hooks,
    forward pre-hooks, weight and object patches, model options) into its UI output, so that a test can
    see through the HTTP API that nothing was left on a model after a prompt failed or was cancelled.
    It runs on every prompt (never a cached result), since the state it reports changes behind ComfyUI's
    back."""
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",)}}

    @classmethod
    def IS_CHANGED(cls, model, clip):
        return float("nan")  # never equal to itself: always re-executed

    def probe(self, model, clip):
        from torch.nn.modules import module as torch_module

        transformer_options = model.model_options.get("transformer_options", {})
        state = {
            "unet": _count_hooks(model.model),
            "clip": _count_hooks(clip.cond_stage_model),
            "global": {"forward_hooks": len(torch_module._global_forward_hooks),
                       "forward_pre_hooks": len(torch_module._global_forward_pre_hooks)},
            "model_patches": len(model.patches), "model_object_patches": len(model.object_patches),
            "clip_patches": len(clip.patcher.patches),
            "model_options": sorted(k for k in model.model_options if k != "transformer_options"),
            "transformer_options": sorted(transformer_options),
            "wrappers": sum(len(v) for v in model.wrappers.values()),
        }
        return {"ui": {"model_state": [state]}}


NODE_CLASS_MAPPINGS["ModelStateProbe"] = ModelStateProbe
