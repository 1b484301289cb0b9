"""TEST FIXTURE node pack (never shipped to users): tiny random models with SD1.5's exact layout and
key names, so graphs in tests need no checkpoint download."""
from . import tiny_sd15

_CACHE = {}


class TinySD15Loader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet": (["narrow", "wide", "mini"],), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, unet, seed):
        key = (unet, seed)
        if key not in _CACHE:
            _CACHE[key] = tiny_sd15.build_all(unet, seed)
        return _CACHE[key]


NODE_CLASS_MAPPINGS = {"TinySD15Loader": TinySD15Loader}
