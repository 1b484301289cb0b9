"""Behaviour pinned across refactors: the sampled latents of one-concept, regional, region-LoRA and fused
sampling, and the fused bundle's content, on the tiny model and on the full-size random SD1.5, equal what
the pack produced when they were recorded (``tests/fixtures/behaviour/``).

Every case goes through the nodes by their released ids, so moving code around cannot hide a change.
A latent after Euler steps is a function of the noise predictions, so equal latents mean equal noise
predictions. The comparison is exact (``torch.equal``, byte digests) on the machine kind the fixture was
recorded on (same torch version and CPU capability); elsewhere float kernels may round differently, and
the latents are compared within 1e-5 of their scale, the bundle digest is skipped.

Re-record (only for an intended change of behaviour, saying why in the commit):
``MIXOFSHOW_RECORD_BEHAVIOUR=1 bash tools/test.sh tests/inprocess/test_behaviour_digests.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import comfy.sample
import pack_nodes as pn
import pytest
import torch
from comfy_env import node
from lora_files import lora_factors, write_kohya_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import make_edlora_state

import nodes as comfy_nodes
from fusion.files.edlora import parse_edlora, to_flat_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "behaviour"
RECORD = os.environ.get("MIXOFSHOW_RECORD_BEHAVIOUR") == "1"
H, W = 64, 96  # pixels: latent 8 x 12, odd feature sizes at the coarse layers


def machine() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _sample(model, positive, negative, steps=2, seed=7, cfg=5.0):
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed).float()


def _encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def _cases(env, model, clip, tag: str, model_channels: int, text_layers: int, text_intermediate: int) -> tuple:
    """(latents by case, the fused bundle's path)."""
    shapes = dict(model_channels=model_channels, text_layers=text_layers, text_intermediate=text_intermediate)
    edloras = env.base / "models" / "edloras"
    names = []
    for i in range(2):
        # reproducible bytes (the file digest is in the bundle): not a .pth (torch.save writes a random
        # serialization id), and no safetensors metadata (written in hash-map order)
        name = f"bd_{tag}_{i}.safetensors"
        state = make_edlora_state((f"<bd{tag}{i}a>", f"<bd{tag}{i}b>"), seed=900 + i, whole_block=i == 0, **shapes)
        save_file(to_flat_state_dict(parse_edlora(state, name)), str(edloras / name))
        names.append(name)
    loras = []
    for i in range(2):
        name = f"bd_{tag}_lora{i}.safetensors"
        write_kohya_lora(env.base / "models" / "loras" / name, lora_factors(
            910 + i, model_channels=model_channels, text_layers=text_layers, text_intermediate=text_intermediate,
            scale=0.7))
        loras.append(name)
    out = {}
    neg = _encode(clip, "blurry, lowres")
    # one concept
    m1, c1, s1 = pn.load_edlora(model, clip, names[0])
    out["one_concept"] = _sample(m1, pn.text_encode(c1, s1, f"a photo of <bd{tag}0a> <bd{tag}0b>, (smiling:1.2)"),
                                 neg)
    # regional: two ED-LoRAs chained, two box regions (one odd box), global prompt
    m2, c2, s2 = pn.load_edlora(m1, c1, names[1], concepts=s1)
    left = pn.box_mask(W, H, 0, 0, H, W // 2 + 5)
    right = pn.box_mask(W, H, 3, W // 2 - 7, H - 2, W)
    regions = pn.region(pn.text_encode(c2, s2, f"a <bd{tag}0a> <bd{tag}0b>"), neg, left)
    regions = pn.region(pn.text_encode(c2, s2, f"a <bd{tag}1a> <bd{tag}1b> in the rain"), neg, right, regions,
                        control_strength=1.0)
    out["regional"] = pn.regional_ksampler(m2, 7, 2, 5.0, "euler", "normal", _encode(c2, "two people"), neg,
                                           {"samples": torch.zeros(1, 4, H // 8, W // 8)}, 1.0, regions)["samples"]
    # a LoRA per region, on the base model
    ma, ca, sa = node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=loras[0], trigger_words="ohwx man",
                      strength_model=1.0, strength_clip=1.0)
    mb, cb, _ = node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=loras[1], trigger_words="sks woman",
                     strength_model=0.8, strength_clip=0.8)
    lora_regions = pn.region(_encode(ca, "a photo of ohwx man"), neg, left, model=ma)
    lora_regions = pn.region(_encode(cb, "a photo of sks woman"), neg, right, lora_regions, model=mb)
    out["region_lora"] = pn.regional_ksampler(model, 7, 2, 5.0, "euler", "normal", _encode(clip, "two people"), neg,
                                              {"samples": torch.zeros(1, 4, H // 8, W // 8)}, 1.0,
                                              lora_regions)["samples"]
    # fused: the two ED-LoRAs at strength 1, fused on the base, sampled, saved
    f1, g1, t1 = pn.load_edlora(model, clip, names[0], 1.0, 1.0)
    _, _, t2 = pn.load_edlora(f1, g1, names[1], 1.0, 1.0, concepts=t1)
    fm, fc, fs = node("MixOfShowGradientFusion", model=model, clip=clip, concepts=t2, steps=1, width=64, height=64,
                      seed=0, solver="closed_form", cache=False)
    out["fused"] = _sample(fm, pn.text_encode(fc, fs, f"<bd{tag}0a> <bd{tag}0b> and <bd{tag}1a> <bd{tag}1b>"), neg)
    bundle = pn.save_fused_bundle(fm, fc, fs, f"bd_{tag}")
    return {k: v.float().contiguous() for k, v in out.items()}, edloras / bundle


def content_digest(path: Path) -> str:
    """sha256 of a safetensors file's content: its metadata and every tensor's name, dtype, shape and bytes
    (the file's own bytes hold the metadata in hash-map order, different on every write)."""
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check(tag: str, latents: dict, bundle: Path) -> None:
    tensors_file, meta_file = FIXTURES / f"{tag}.safetensors", FIXTURES / f"{tag}.json"
    bundle_digest = content_digest(bundle)
    if RECORD:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        save_file(latents, str(tensors_file))
        meta_file.write_text(json.dumps({"machine": machine(), "bundle_sha256": bundle_digest}, indent=1) + "\n")
        pytest.skip(f"recorded {tensors_file.name} and {meta_file.name}")
    expected, meta = load_file(str(tensors_file)), json.loads(meta_file.read_text())
    exact = meta["machine"] == machine()
    assert set(expected) == set(latents)
    for case, ref in expected.items():
        got = latents[case]
        if exact:
            assert torch.equal(got, ref), f"{tag} {case}: max |diff| {float((got - ref).abs().max()):.3g}"
        else:
            torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0, msg=f"{tag} {case}")
    if exact:
        assert bundle_digest == meta["bundle_sha256"], f"{tag}: the fused bundle's bytes changed"


def test_tiny_model_behaviour_is_unchanged(env, tiny):
    model, clip, _ = tiny
    with torch.inference_mode():
        latents, bundle = _cases(env, model, clip, "tiny", 32, 2, 512)
    _check("tiny", latents, bundle)


def test_full_size_sd15_behaviour_is_unchanged(env, sd15):
    model, clip = sd15
    with torch.inference_mode():
        latents, bundle = _cases(env, model, clip, "sd15", 320, 12, 3072)
    _check("sd15", latents, bundle)
