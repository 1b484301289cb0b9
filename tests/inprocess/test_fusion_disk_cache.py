"""The fusion cache inside ComfyUI: hits record nothing, the key sees everything the recordings read,
bad entries are misses that get overwritten, cache off writes nothing, the size cap evicts."""
import functools
import logging
import os
from pathlib import Path

import comfy_extras.nodes_model_advanced as advanced
import pytest
import torch
from comfy import weight_adapter
from fusion_keys import cache_key
from safetensors import safe_open
from safetensors.torch import save_file


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXOFSHOW_FUSION_CACHE_MAX_MB", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def pair(env, tiny, write_edlora):
    en = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    model, clip, _ = tiny
    m, c, concepts = model, clip, None
    for name, tokens, seed in (("ca_a.pth", ("<ca1>", "<ca2>"), 90), ("ca_b.pth", ("<cb1>",), 91)):
        write_edlora(name, tokens=tokens, seed=seed)
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 1.0)
    return m, c, concepts


def settings(env, **kw):
    kw = {"steps": 1, "width": 64, "height": 64, "seed": 3, **kw}
    return env.pack("fusion.merge.gradient_fusion").FusionSettings(**kw)


def fuse(env, model, clip, concepts, s, **kw):
    return env.pack("nodes.glue.fusion_run").fuse(model, clip, concepts, s, **kw)


def test_a_hit_records_nothing_and_gives_the_same_patches(env, tiny, pair, cache_dir):
    model, clip, _ = tiny
    concepts = pair[2]
    first = fuse(env, model, clip, concepts, settings(env))
    assert first[3]["cache"] == "miss" and [p.suffix for p in cache_dir.iterdir()] == [".fused"]
    calls = []
    mods = [clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1,
            model.model.diffusion_model.middle_block[1].proj_in]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in mods]
    try:
        second = fuse(env, model, clip, concepts, settings(env))
    finally:
        for h in hooks:
            h.remove()
    assert second[3]["cache"] == "hit" and calls == []
    fp = env.pack("nodes.glue.fused_patches")
    for a, b in ((first[0], second[0]), (first[1].patcher, second[1].patcher)):
        wa, wb = fp.fused_of(a)[0], fp.fused_of(b)[0]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k][0], wb[k][0]) and torch.equal(wa[k][1], wb[k][1])
                                              for k in wa)
    assert fp.fused_of(second[0])[1]["base"] == fp.fused_of(first[0])[1]["base"]
    # the loaders' outputs as inputs: the same fusion, the same key
    assert fuse(env, pair[0], pair[1], concepts, settings(env))[3]["cache"] == "hit"
    assert fuse(env, model, clip, concepts, settings(env, seed=4))[3]["cache"] == "miss"


def test_cache_off_writes_nothing_and_creates_no_folder(env, tiny, pair, cache_dir):
    model, clip, _ = tiny
    assert fuse(env, model, clip, pair[2], settings(env), use_cache=False)[3]["cache"] == "off"
    assert not cache_dir.exists()


class OtherPackAttention:
    """An attn1 patch as other packs install them (it changes the UNet forward)."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, q, k, v, extra_options):
        return q * self.scale, k, v


def test_the_key_sees_everything_the_recordings_read(env, tiny, pair, tmp_path):
    model, clip, _ = tiny
    concepts = pair[2]
    key = functools.partial(cache_key, env)
    base = key(model, clip, concepts, settings(env))
    assert key(model.clone(), clip.clone(), concepts, settings(env)) == base
    assert key(pair[0], pair[1], concepts, settings(env)) == base  # loader outputs: their fused-weight patches aside

    skip = clip.clone()
    skip.clip_layer(-2)
    vpred = advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    attn = model.clone()
    attn.set_model_attn1_patch(OtherPackAttention(0.5))
    attn_other = model.clone()
    attn_other.set_model_attn1_patch(OtherPackAttention(0.7))
    other_lora = model.clone()  # a LoRA on a weight that is not fused (conv_in): it changes every recorded row
    w = other_lora.model.diffusion_model.input_blocks[0][0].weight
    other_lora.add_patches({"diffusion_model.input_blocks.0.0.weight": weight_adapter.LoRAAdapter(
        set(), (torch.ones(w.shape[0], 1, 1, 1), torch.ones(1, *w.shape[1:]) * 1e-3, None, None, None, None))}, 1.0)
    Concept = env.pack("fusion.prompts.concepts").Concept
    ConceptSet = env.pack("fusion.prompts.concepts").ConceptSet
    a, b = concepts.concepts
    weaker = ConceptSet().add(a).add(Concept(b.edlora, b.text_encoder_strength, 0.5, unet_factors=b.unet_factors,
                                              text_factors=b.text_factors))
    changed_factors = {k: (up * 1.01, down) for k, (up, down) in b.unet_factors.items()}
    in_memory = ConceptSet().add(a).add(Concept(b.edlora, 1.0, 1.0, unet_factors=changed_factors,
                                                text_factors=b.text_factors))
    variants = {
        "clip skip": key(model, skip, concepts, settings(env)),
        "v-prediction": key(vpred, clip, concepts, settings(env)),
        "attention patch": key(attn, clip, concepts, settings(env)),
        "attention patch setting": key(attn_other, clip, concepts, settings(env)),
        "LoRA on another weight": key(other_lora, clip, concepts, settings(env)),
        "strength": key(model, clip, weaker, settings(env)),
        "factors, same file name": key(model, clip, in_memory, settings(env)),
        "order": key(model, clip, ConceptSet().add(b).add(a), settings(env)),
        **{f"setting {k}": key(model, clip, concepts, settings(env, **{k: v})) for k, v in
           (("steps", 2), ("width", 72), ("height", 72), ("seed", 4), ("solver", "lbfgs"), ("sampler", "euler"),
            ("scheduler", "karras"), ("ridge", 0.5))},
    }
    assert base not in variants.values() and len(set(variants.values())) == len(variants), variants
    # the code version: a new recording or solver version is another key
    cache = env.pack("fusion.merge.cache")
    original = cache.code_version
    try:
        cache.code_version = lambda host: original(host, recording=2)
        assert key(model, clip, concepts, settings(env)) != base
        cache.code_version = lambda host: original(host, solver=2)
        assert key(model, clip, concepts, settings(env)) != base
    finally:
        cache.code_version = original


def test_trigger_words_and_embedding_files_are_in_the_key(env, tiny, pair):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    model, tiny_clip, _ = tiny
    folder = env.folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(folder, exist_ok=True)
    # the tiny CLIP with an embeddings folder (the fixture's has none), same weights
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, env.tiny.TinySD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=folder)
    clip.cond_stage_model.load_state_dict(tiny_clip.cond_stage_model.state_dict())
    g = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, 768, generator=g) * 0.02}, os.path.join(folder, "ca_ti.safetensors"))
    Concept = env.pack("fusion.prompts.concepts").Concept
    a = pair[2].concepts[0]
    plain = Concept(env.pack("fusion.files.edlora").EDLoRA(name="plain.safetensors", digest="d"), 1.0, 1.0,
                    trigger_words="embedding:ca_ti woman", unet_factors=a.unet_factors, text_factors=a.text_factors)
    other_words = Concept(plain.edlora, 1.0, 1.0, trigger_words="embedding:ca_ti man", unet_factors=a.unet_factors,
                          text_factors=a.text_factors)
    ConceptSet = env.pack("fusion.prompts.concepts").ConceptSet
    key = functools.partial(cache_key, env)
    s = settings(env)
    k1 = key(model, clip, ConceptSet().add(pair[2].concepts[1]).add(plain), s)
    k2 = key(model, clip, ConceptSet().add(pair[2].concepts[1]).add(other_words), s)
    save_file({"emb_params": torch.randn(2, 768, generator=g) * 0.02}, os.path.join(folder, "ca_ti.safetensors"))
    k3 = key(model, clip, ConceptSet().add(pair[2].concepts[1]).add(plain), s)  # same words, new embedding file
    assert len({k1, k2, k3}) == 3


def _entry(cache_dir):
    (path,) = [p for p in cache_dir.iterdir() if p.suffix == ".fused"]
    return path


def _rewrite(path, change):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "foreign", "wrong shape", "non-finite",
                                    "other weights"])
def test_a_bad_entry_is_a_miss_with_a_warning_and_is_overwritten(env, tiny, pair, cache_dir, caplog, damage):
    model, clip, _ = tiny
    concepts = pair[2]
    fuse(env, model, clip, concepts, settings(env))
    path = _entry(cache_dir)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "not safetensors":
        path.write_bytes(b"\x00" * 100)
    elif damage == "foreign":
        save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    elif damage == "wrong shape":
        _rewrite(path, lambda t, m: t.update({k: torch.zeros(v.shape[0] + 1, *v.shape[1:])
                                              for k, v in list(t.items()) if k.endswith("lora_up.weight")}))
    elif damage == "non-finite":
        def nan(t, m):
            k = next(k for k in t if k.endswith("lora_down.weight"))
            t[k][0, 0] = float("nan")
        _rewrite(path, nan)
    else:  # a valid bundle, but of fewer weights than this fusion has
        def drop(t, m):
            module = next(k for k in t if k.endswith(".alpha"))[:-len(".alpha")]
            for suffix in (".alpha", ".lora_up.weight", ".lora_down.weight"):
                del t[module + suffix]
        _rewrite(path, drop)
    path_bytes_after_damage = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="mixofshow"):
        result = fuse(env, model, clip, concepts, settings(env))
    assert result[3]["cache"] == "miss" and "is unusable" in caplog.text
    assert _entry(cache_dir).read_bytes() != path_bytes_after_damage  # recomputed and overwritten
    again = fuse(env, model, clip, concepts, settings(env))
    assert again[3]["cache"] == "hit"
    fp = env.pack("nodes.glue.fused_patches")
    wa, wb = fp.fused_of(result[0])[0], fp.fused_of(again[0])[0]
    assert all(torch.equal(wa[k][1], wb[k][1]) for k in wa)


def test_the_size_cap_evicts_the_least_recently_used(env, tiny, pair, cache_dir, monkeypatch, caplog):
    model, clip, _ = tiny
    concepts = pair[2]
    fuse(env, model, clip, concepts, settings(env, seed=10))
    size = _entry(cache_dir).stat().st_size
    old = cache_dir / "0ld.fused"  # an old (e.g. 0.1.0, GB-sized) entry that was never used since
    old.write_bytes(b"x" * size)
    os.utime(old, (1, 1))
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE_MAX_MB", str(2.5 * size / 2**20))
    fuse(env, model, clip, concepts, settings(env, seed=11))
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2 and "0ld.fused" not in names
    fuse(env, model, clip, concepts, settings(env, seed=12))  # the seed-10 entry is now the oldest
    assert len(list(cache_dir.iterdir())) == 2
    assert fuse(env, model, clip, concepts, settings(env, seed=10))[3]["cache"] == "miss"
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE_MAX_MB", str(0.5 * size / 2**20))
    with caplog.at_level(logging.WARNING, logger="mixofshow"):
        stats = fuse(env, model, clip, concepts, settings(env, seed=13))[3]
    assert stats["cache_file"] is None and "larger than the cache cap" in caplog.text


V0_2_ENTRY = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v0_2"


def test_an_entry_written_by_release_0_2_0_still_hits_and_is_renamed(env, tiny, cache_dir):
    """tests/fixtures/cache_v0_2 holds the cache entry release 0.2.0 (888a5c3) wrote for this fusion (made by
    fusing the two ED-LoRAs below with its code): the recording and solve are unchanged since (versions 1), so it
    is found under 0.2.0's key, renamed to today's key, and nothing is recorded. It was written on ComfyUI 0.3.75;
    the host's version is part of every key (its samplers and encoders record), so on another host it must miss."""
    from synthetic import make_edlora_state

    from fusion.files.edlora import parse_edlora, to_flat_state_dict
    en = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    model, clip, _ = tiny
    m, c, concepts = model, clip, None
    for i, toks in enumerate([("<cva>", "<cvb>"), ("<cvc>",)]):
        name = f"cache_v02_{i}.safetensors"  # the same bytes as 0.2.0 fused (no metadata, no pickle)
        save_file(to_flat_state_dict(parse_edlora(make_edlora_state(
            toks, seed=700 + i, model_channels=32, text_layers=2, text_intermediate=512, whole_block=False), name)),
            str(env.base / "models" / "edloras" / name))
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 1.0)
    cache_dir.mkdir()
    (old,) = V0_2_ENTRY.glob("*.fused")
    (cache_dir / old.name).write_bytes(old.read_bytes())
    s = settings(env, steps=2, seed=0)
    key = cache_key(env, model, clip, concepts, s)
    assert key != old.stem
    with torch.inference_mode():
        _, _, _, stats = fuse(env, model, clip, concepts, s)
    if env.pack("nodes.glue.fusion_recording").host_version() != "ComfyUI 0.3.75":
        assert stats["cache"] == "miss" and all(stats["recorded"].values())
        return
    assert stats["cache"] == "hit" and stats["recorded"] == {"text": 0, "cross_kv": 0, "unet": 0}
    assert [p.name for p in cache_dir.iterdir()] == [f"{key}.fused"]
