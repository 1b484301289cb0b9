"""Issue 23: what a hostile-input run still found, refused (or made to work) naming the file, key, region or node
input — LoRAs as concepts with absurd values or on 1-D weights, regions whose masks have different sizes, long
prompts without concept tokens, save paths no file system takes. Every file here is written as trainers write
them (tests/support/lora_files.py, synthetic.py) and run through the pack's nodes in a real ComfyUI."""
import re

import pytest
from comfy_env import node
from lora_files import lora_factors, write_kohya_lora

UP = ".lora_up.weight"


def write_lora(env, name: str, factors: dict) -> str:
    write_kohya_lora(env.base / "models" / "loras" / name, factors)
    return name


def lora_concept(model, clip, name: str, words: str = "ohwx person"):
    return node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name, trigger_words=words,
                strength_model=1.0, strength_clip=1.0, concepts=None)


# ------------------------------------------------------------------------------ absurd but finite values

@pytest.mark.parametrize("part, value", [("unet", 1e30), ("text", 1e20)])
def test_lora_as_concept_with_values_no_trained_file_has_is_refused(env, tiny, part, value):
    """The hostile run's up factors: finite, and NaN/Inf latents once applied. The ED-LoRA rule applies."""
    model, clip, _ = tiny
    factors = lora_factors(300, attention_only=True)
    module = next(m for m, (p, _, _) in factors.items() if p == part)
    factors[module][1].view(-1)[0] = value
    name = write_lora(env, f"absurd_{part}.safetensors", factors)
    prefix = "lora_unet_" if part == "unet" else "lora_te_"
    key = prefix + module.replace(".", "_") + UP
    with pytest.raises(ValueError, match=re.escape(f"{name}: '{key}' holds a value of {value:.3g}, beyond ±10000")):
        lora_concept(model, clip, name)


def test_lora_as_concept_whose_weight_change_is_absurd_is_refused(env, tiny):
    model, clip, _ = tiny
    factors = lora_factors(301, attention_only=True, text=False)
    module = next(iter(factors))
    factors[module][1].fill_(5e3)
    factors[module][2].fill_(5e3)
    name = write_lora(env, "absurd_change.safetensors", factors)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: 'diffusion_model\.[^']*\.weight': its factors can "
                                         r"change a weight by up to .*, beyond ±10000"):
        lora_concept(model, clip, name)
