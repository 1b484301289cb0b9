"""fusion/bundle.py: the version-2 layout (a kohya LoRA plus tables and metadata), 0.1.0's version 1, and
the validation every bundle gets before anything is applied."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fusion.errors import BundleError
from fusion.files.bundle import FusedBundle, is_bundle, load_bundle, save_bundle
from fusion.versions import BUNDLE_FORMAT

UNET = "lora_unet_down_blocks_0_attentions_0_proj_in"
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONCEPTS = [{"name": "a.pth", "digest": "d1", "tokens": ["<a1>", "<a2>"], "trigger_words": "",
             "text_encoder_strength": 1.0, "unet_strength": 1.0},
            {"name": "b.safetensors", "digest": "d2", "tokens": [], "trigger_words": "ohwx woman",
             "text_encoder_strength": 0.8, "unet_strength": 1.0}]


def bundle():
    g = torch.Generator().manual_seed(0)
    return FusedBundle(lora={UNET: (torch.randn(32, 6, 1, 1, generator=g), torch.randn(6, 32, 1, 1, generator=g)),
                             TEXT: (torch.randn(768, 6, generator=g), torch.randn(6, 768, generator=g))},
                       concepts=CONCEPTS, tables={"clip_l": {"<a1>": torch.randn(16, 1, 768, generator=g),
                                                            "<a2>": torch.randn(16, 2, 768, generator=g)}},
                       base="base-digest", settings={"steps": 4, "ridge": 0.01})


def write_raw(path, tensors, **meta):
    meta = {"format": BUNDLE_FORMAT, "version": "2", "concepts": json.dumps(CONCEPTS[:1]), **meta}
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return str(path)


def good_tensors():
    return {f"{UNET}.lora_up.weight": torch.randn(4, 2), f"{UNET}.lora_down.weight": torch.randn(2, 3),
            f"{UNET}.alpha": torch.tensor(2.0), "new_concept_embedding.<a1>": torch.randn(16, 768),
            "new_concept_embedding.<a2>": torch.randn(16, 768)}


def test_version_2_round_trip_is_a_kohya_lora(tmp_path):
    b = bundle()
    path = str(tmp_path / "fused.SAFETENSORS")  # upper-case extension: still a bundle
    save_bundle(b, path)
    assert is_bundle(path) and not is_bundle(str(tmp_path / "missing.safetensors"))
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert float(f.get_tensor(f"{UNET}.alpha")) == 6.0  # alpha = rank: scale 1 in any LoRA loader
        assert f.get_tensor(f"{UNET}.lora_up.weight").dtype == torch.float32
        assert f.get_tensor("new_concept_embedding.<a1>").shape == (16, 768)  # single-vector tables as [16, 768]
    assert {f"{TEXT}.lora_up.weight", f"{TEXT}.lora_down.weight", f"{TEXT}.alpha"} <= keys
    assert meta["format"] == BUNDLE_FORMAT and meta["version"] == "2"
    r = load_bundle(path)
    assert r.version == "2" and r.base == "base-digest" and r.settings == b.settings and r.concepts == CONCEPTS
    for name, (up, down) in b.lora.items():
        assert torch.equal(r.lora[name][0], up) and torch.equal(r.lora[name][1], down)
    torch.testing.assert_close(r.tables["clip_l"]["<a2>"], b.tables["clip_l"]["<a2>"])
    (ea, wa), (eb, wb) = r.edloras()
    assert ea.tokens == ["<a1>", "<a2>"] and wa == "" and not ea.unet and ea.digest == "d1"
    assert eb.tokens == [] and wb == "ohwx woman"


def test_alpha_other_than_rank_is_folded_into_up(tmp_path):
    t = good_tensors()
    t[f"{UNET}.alpha"] = torch.tensor(1.0)  # rank 2: scale 0.5
    r = load_bundle(write_raw(tmp_path / "a.safetensors", t))
    torch.testing.assert_close(r.lora[UNET][0], 0.5 * t[f"{UNET}.lora_up.weight"])


def test_version_1_bundles_of_0_1_0_still_read(tmp_path):
    path = str(tmp_path / "old.safetensors")
    write_v1_bundle(path, {"diffusion_model.x.weight": torch.randn(4, 3).half()},
                    {"clip_l.transformer.y.weight": torch.randn(2, 2)},
                    [{"name": "a.pth", "tokens": ["<a1>"], "digest": "d"}], {"<a1>": torch.randn(16, 1, 768)})
    r = load_bundle(path)
    assert r.version == "1" and set(r.weights) == {"model.diffusion_model.x.weight", "clip.clip_l.transformer.y.weight"}
    assert r.weights["model.diffusion_model.x.weight"].dtype == torch.float16 and not r.lora
    assert [e.tokens for e, _ in r.edloras()] == [["<a1>"]]


def write_v1_bundle(path, model, clip, concepts, embeddings, base="base-id", settings=None):
    """0.1.0's writer (fusion/bundle.py save_bundle at dae95f7), verbatim but for the argument list."""
    tensors = {}
    for k, v in model.items():
        tensors["model." + k] = v.detach().contiguous().cpu()
    for k, v in clip.items():
        tensors["clip." + k] = v.detach().contiguous().cpu()
    for tok, t in embeddings.items():
        tensors["new_concept_embedding." + tok] = t.detach().float().contiguous().cpu()
    meta = {"format": BUNDLE_FORMAT, "version": "1", "base": base,
            "concepts": json.dumps(concepts), "settings": json.dumps(settings or {}, sort_keys=True)}
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("case, match", [
    ("bad_json", "'concepts' is not valid JSON"),
    ("settings_not_dict", "'settings' must be a JSON dict"),
    ("no_concepts", "lists no concepts"),
    ("no_tokens", "has no 'tokens' list"),
    ("no_words", "neither tokens nor trigger words"),
    ("table_15", r"\[15, 768\]; an SD1.x ED-LoRA token table is \[16, 768\]"),
    ("table_1024", "\\[16, 1024\\].*SD2.x"),
    ("nan_factor", "NaN and .* infinite values"),
    ("inf_table", "NaN and .* infinite values"),
    ("int_tensor", "is int32 .*floating point"),
    ("unexpected", "unexpected tensor 'something.else'"),
    ("no_alpha", "has only lora_down.weight, lora_up.weight"),
    ("bad_shapes", r"factors \(4, 2\) @ \(3, 3\)"),
    ("token_without_table", r"tokens \['<a2>'\] that have no table"),
    ("table_without_concept", r"tables \['<zz>'\] belong to no listed concept"),
    ("newer_version", "format version '3'"),
    ("no_weights", "holds no fused weights"),
    ("bad_strength", "'unet_strength' must be a number"),
    # finite, but no trained file holds them (the ED-LoRA rule, filecheck.MAX_ABS_VALUE)
    ("absurd_table", r"'new_concept_embedding.<a2>' holds a value of 3e\+38, beyond ±10000"),
    ("absurd_factor", r"'lora_unet_.*lora_up.weight' holds a value of 1e\+30, beyond ±10000"),
    ("absurd_change", r"'lora_unet_.*_proj_in': its factors can change a weight by up to 2e\+08, beyond ±10000"),
])
def test_bad_bundles_are_refused_naming_the_file(tmp_path, case, match):
    t, meta = good_tensors(), {}
    if case == "bad_json":
        meta["concepts"] = "[{'name': 1"
    elif case == "settings_not_dict":
        meta["settings"] = "[1, 2]"
    elif case == "no_concepts":
        meta["concepts"] = "[]"
    elif case == "no_tokens":
        meta["concepts"] = json.dumps([{"name": "a.pth"}])
    elif case == "no_words":
        meta["concepts"] = json.dumps([{"name": "a.pth", "tokens": [], "trigger_words": " "}])
    elif case == "table_15":
        t["new_concept_embedding.<a1>"] = torch.randn(15, 768)
    elif case == "table_1024":
        t["new_concept_embedding.<a1>"] = torch.randn(16, 1024)
    elif case == "nan_factor":
        t[f"{UNET}.lora_up.weight"][0, 0] = float("nan")
    elif case == "inf_table":
        t["new_concept_embedding.<a2>"][3, 3] = float("inf")
    elif case == "int_tensor":
        t[f"{UNET}.lora_down.weight"] = torch.ones(2, 3, dtype=torch.int32)
    elif case == "unexpected":
        t["something.else"] = torch.zeros(1)
    elif case == "no_alpha":
        del t[f"{UNET}.alpha"]
    elif case == "bad_shapes":
        t[f"{UNET}.lora_down.weight"] = torch.randn(3, 3)
    elif case == "token_without_table":
        del t["new_concept_embedding.<a2>"]
    elif case == "table_without_concept":
        t["new_concept_embedding.<zz>"] = torch.randn(16, 768)
    elif case == "newer_version":
        meta["version"] = "3"
    elif case == "no_weights":
        t = {k: v for k, v in t.items() if k.startswith("new_concept")}
    elif case == "bad_strength":
        meta["concepts"] = json.dumps([{**CONCEPTS[0], "unet_strength": "high"}])
    elif case == "absurd_table":
        t["new_concept_embedding.<a2>"][3, 3] = 3e38
    elif case == "absurd_factor":
        t[f"{UNET}.lora_up.weight"][1, 1] = 1e30
    elif case == "absurd_change":  # alpha 2 = rank: scale 1; each value within the bound
        t[f"{UNET}.lora_up.weight"] = torch.full((4, 2), 1e4)
        t[f"{UNET}.lora_down.weight"] = torch.full((2, 3), 1e4)
    path = write_raw(tmp_path / f"{case}.safetensors", t, **meta)
    with pytest.raises(BundleError, match=rf"{case}\.safetensors: .*{match}"):
        load_bundle(path)


def test_unreadable_and_foreign_files(tmp_path):
    good = str(tmp_path / "good.safetensors")
    save_bundle(bundle(), good)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated.safetensors: not a readable safetensors file"):
        load_bundle(str(truncated))
    assert not is_bundle(str(truncated))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(BundleError, match="junk.safetensors: not a readable"):
        load_bundle(str(junk))
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"x": torch.zeros(1)}, foreign, metadata={"format": "other"})
    with pytest.raises(BundleError, match="foreign.safetensors: not a fused ED-LoRA bundle"):
        load_bundle(foreign)
    assert not os.path.exists(good + ".part")


def test_a_failed_write_leaves_no_part_file(tmp_path):
    """Like save_edlora: the temporary file goes when the write fails (here the rename: the target is a
    folder), and the error is the writer's own."""
    from fusion.files.edlora import EDLoRA, save_edlora

    for name in ("bundle.safetensors", "edlora.safetensors"):
        (tmp_path / name).mkdir()
    with pytest.raises(OSError):
        save_bundle(bundle(), str(tmp_path / "bundle.safetensors"))
    edlora = EDLoRA(name="e.pth", tables={"clip_l": {"<e1>": torch.zeros(16, 1, 768)}})
    with pytest.raises(OSError):
        save_edlora(edlora, str(tmp_path / "edlora.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.safetensors", "edlora.safetensors"]
