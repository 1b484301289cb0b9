"""The files the browser tier's run of the SDXL example uses in place of the full-size ones (see
tools/make_example_workflows.py: TINY_SDXL): three tiny SDXL LoRAs and a tiny SDXL OpenPose ControlNet that fit the
fixture pack's tiny SDXL. Run as a script (it imports ComfyUI for the ControlNet's layout, in its own process):

    python tests/support/tiny_sdxl_files.py MODELS_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

from lora_files import lora_factors, write_kohya_lora
from safetensors.torch import save_file
from synthetic import TINY_XL_SHAPES

from fusion.families import SDXL


def write(models: Path, names) -> None:
    (models / "loras").mkdir(parents=True, exist_ok=True)
    (models / "controlnet").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        path = models / "loras" / f"tiny_sdxl_{name}.safetensors"
        if not path.exists():
            write_kohya_lora(path, lora_factors(300 + i, family=SDXL, scale=0.5, **TINY_XL_SHAPES))
    path = models / "controlnet" / "tiny_sdxl_openpose.safetensors"
    if not path.exists():
        import comfy_env

        save_file(comfy_env.env().tiny_xl.controlnet_state_dict(5), str(path))


if __name__ == "__main__":
    import demo

    write(Path(sys.argv[1]), demo.SDXL_LORAS)
