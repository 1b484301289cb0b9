import os
from pathlib import Path

import comfy_env
import pytest
from host_tier import module_without_host

SD15_CHECKPOINT = Path(os.environ.get("MIXOFSHOW_SD15_RANDOM", Path(__file__).resolve().parents[2] / ".host" / "models"
                                      / "sd15_random_fp16.safetensors"))
MISSING_HOST = comfy_env.missing_host_reason()
if not MISSING_HOST:
    comfy_env.env()  # ComfyUI must be importable before the test modules are collected


def pytest_pycollect_makemodule(module_path, parent):
    if MISSING_HOST:
        return module_without_host(module_path, parent, MISSING_HOST)
    return None


@pytest.fixture(scope="session")
def env():
    return comfy_env.env()


@pytest.fixture(scope="session")
def sd15(env):
    """(MODEL, CLIP) of the full-size random-weight SD1.5 checkpoint, loaded once per test run."""
    import comfy.sd

    if not SD15_CHECKPOINT.is_file():
        pytest.skip(f"no full-size random SD1.5 at {SD15_CHECKPOINT} (tools/host/make_sd15_random.py makes it)")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(SD15_CHECKPOINT), output_vae=False, output_clip=True,
        embedding_directory=env.folder_paths.get_folder_paths("embeddings"))
    return model, clip


@pytest.fixture(scope="session")
def tiny(env):
    """(MODEL, CLIP, VAE) of the tiny SD1.5-layout model (32 channels, 2-layer 768-wide CLIP)."""
    return env.tiny.build_all("narrow", 0)


@pytest.fixture(scope="session")
def write_edlora(env):
    """Write a synthetic ED-LoRA for the tiny model into models/edloras; returns its file name."""
    from synthetic import make_edlora_state

    def write(name: str, tokens=("<c1>", "<c2>"), seed=0, **kw):
        kw.setdefault("model_channels", 32)
        kw.setdefault("text_layers", 2)
        kw.setdefault("text_intermediate", 512)
        return _save_edlora_state(env, make_edlora_state(tuple(tokens), seed=seed, **kw), name)

    return write


@pytest.fixture(scope="session")
def tiny_xl(env):
    """(MODEL, CLIP, VAE) of the tiny SDXL-layout model (70 cross-attention layers at 64 channels; CLIP-L 768 and
    bigG 1280 wide, 3 layers each)."""
    return env.tiny_xl.build_all("narrow", 0)


@pytest.fixture(scope="session")
def write_xl_edlora(env):
    """Write a synthetic SDXL ED-LoRA (Concept Conductor's layout) for the tiny SDXL into models/edloras; returns its
    file name. ``state`` (optional) edits the state before it is written."""
    from synthetic import TINY_XL_SHAPES, make_edlora_state

    from fusion.families import SDXL

    def write(name: str, tokens=("<x1>", "<x2>"), seed=0, state=None, **kw):
        kw = {**TINY_XL_SHAPES, **kw}
        raw = make_edlora_state(tuple(tokens), seed=seed, family=SDXL, **kw)
        if state is not None:
            state(raw)
        return _save_edlora_state(env, raw, name)

    return write


def _save_edlora_state(env, state: dict, name: str) -> str:
    """Write a raw ED-LoRA state into models/edloras: the flat layout for .safetensors, else a torch.save."""
    import torch

    path = env.base / "models" / "edloras" / name
    if name.endswith(".safetensors"):
        from fusion.files.edlora import parse_edlora, save_edlora
        save_edlora(parse_edlora(state, name), str(path))
    else:
        torch.save(state, path)
    return name
