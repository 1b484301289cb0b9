"""Gradient fusion in a real in-process ComfyUI (tiny SD1.5-layout model): the fused result is the base
plus ordinary LoRA patches that reproduce each concept, for ED-LoRAs and plain LoRAs alike; inputs are
left alone; bundles round-trip (Load ED-LoRA, the stock Load LoRA, 0.1.0 bundles); the node runs in a
prompt."""
import importlib.util
import shutil
from pathlib import Path

import comfy.model_management as mm
import pack_nodes as pn
import pytest
import torch
from fusion_errors import check_fused_beats_summing, own_layer_errors
from safetensors.torch import save_file
from weights import effective_weight

import nodes as comfy_nodes

STEPS, SIZE = 2, 64


def _unit_test_module(name):
    path = Path(__file__).resolve().parents[1] / "unit" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_unit_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fusion_cache(tmp_path, monkeypatch):
    """Each test gets its own (not yet existing) fusion cache folder."""
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(env):
    return env.pack("nodes.glue.fusion_run")


def patches(env):
    return env.pack("nodes.glue.fused_patches")


def settings(env, **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 5)
    return env.pack("fusion.merge.gradient_fusion").FusionSettings(**kw)


def load_set(env, tiny, names, te=1.0, unet=1.0, model=None, clip=None, concepts=None):
    model0, clip0, _ = tiny
    model, clip = model or model0, clip or clip0
    en = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    for name in names:
        model, clip, concepts = en.apply_edlora(model, clip, concepts, folders.edlora_path(name), te, unet)
    return model, clip, concepts


def snapshot(model, clip):
    return ({k: [id(p[1]) for p in v] for k, v in model.patches.items()},
            {k: [id(p[1]) for p in v] for k, v in clip.patcher.patches.items()}, dict(model.model_options))


def count_hooks(model, clip):
    mods = list(model.model.diffusion_model.modules()) + list(clip.cond_stage_model.modules())
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def own_vs_fused(env, tiny, name, text, fc, fcs, concepts):
    """Relative errors (fused vs own merged CLIP, base vs own) of the layer-wise stack, unpadded positions."""
    model, clip, _ = tiny
    enc = env.pack("nodes.glue.layerwise")
    _, own_clip, own = load_set(env, tiny, [name])
    tokens = enc.tokenize_with_concepts(clip, text, own)[0]["l"][0]
    n = next(j for j, t in enumerate(tokens) if j > 0 and t[0] == 49407) + 1
    ref = enc.layerwise_of(enc.encode_with_concepts(own_clip, text, own)[0])[:, :, :n]
    got = enc.layerwise_of(enc.encode_with_concepts(fc, text, fcs)[0])[:, :, :n]
    base = enc.layerwise_of(enc.encode_with_concepts(clip, text, concepts)[0])[:, :, :n]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(got, ref), rel(base, ref)


@pytest.mark.parametrize("ridge", [0.0, None])
def test_identical_loras_are_reproduced(env, tiny, write_edlora, capsys, ridge):
    """Two ED-LoRAs with the same LoRA (same seed, other token names): fusion reproduces each one's own
    encoder on its recorded prompts -- exactly without regularisation, closely with the default ridge."""
    model, clip, _ = tiny
    a = write_edlora("fu_same_a.pth", tokens=("<ga1>",), seed=50)
    b = write_edlora("fu_same_b.pth", tokens=("<gb1>",), seed=50)
    _, _, concepts = load_set(env, tiny, [a, b])
    kw = {} if ridge is None else {"ridge": ridge}
    fm, fc, fcs, _ = run(env).fuse(model, clip, concepts, settings(env, **kw), use_cache=False)
    for name, tok in ((a, "<ga1>"), (b, "<gb1>")):
        for text in (f"photo of a {tok}", tok):
            err, err_base = own_vs_fused(env, tiny, name, text, fc, fcs, concepts)
            with capsys.disabled():
                print(f"\n[fusion] identical LoRAs, ridge {ridge}, {text!r}: rel. error {err:.2e} "
                      f"(base {err_base:.3f})")
            # the ridge shrinks the change where the rows are weak: still 20x closer than the base encoder
            assert err < (1e-3 if ridge == 0.0 else 0.05 * err_base)


@pytest.fixture(scope="module")
def two(env, write_edlora):
    a = write_edlora("fu_a.pth", tokens=("<fa1>", "<fa2>"), seed=21)
    b = write_edlora("fu_b.pth", tokens=("<fb1>",), seed=22)
    c = write_edlora("fu_c.safetensors", tokens=("<fc1>", "<fc2>"), seed=23)
    return a, b, c


def test_bad_inputs_fail_before_any_work(env, tiny, two, write_edlora):
    model, clip, _ = tiny
    fuse = run(env).fuse
    with pytest.raises(ValueError, match="at least one concept"):
        fuse(model, clip, None, settings(env))
    with pytest.raises(ValueError, match="at least one concept"):
        fuse(model, clip, env.pack("fusion.prompts.concepts").ConceptSet(), settings(env))
    dup = write_edlora("fu_dup.pth", tokens=("<fa1>",), seed=30)
    with pytest.raises(ValueError, match="fu_a.pth.*fu_dup.pth"):
        load_set(env, tiny, [two[0], dup])
    # concepts whose factors do not fit this MODEL (e.g. loaded on another base): refused, no hook ever fires
    good = load_set(env, tiny, [two[0]])[2]
    other_model, other_clip, _ = env.tiny.build_all("wide", 0)
    bad = load_set(env, tiny, [write_edlora("fu_other.pth", tokens=("<fo1>",), seed=31, model_channels=64)],
                   model=other_model, clip=other_clip, concepts=None)[2]
    mixed = good.add(bad.concepts[0])
    calls = []
    h = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.register_forward_pre_hook(
        lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"fu_other\.pth.*do not fit the MODEL weight"):
            fuse(model, clip, mixed, settings(env))
    finally:
        h.remove()
    assert calls == []


def test_fusion_reproduces_each_concept_as_lora_patches_and_leaves_inputs_alone(env, tiny, two, capsys):
    model, clip, _ = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    before = snapshot(model, clip)
    hooks_before = count_hooks(model, clip)
    enc = env.pack("nodes.glue.layerwise")
    base_stack = enc.layerwise_of(enc.encode_with_concepts(clip, "a <fa1> <fa2>", concepts)[0])

    fm, fc, fcs, stats = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    assert stats["recorded"]["text"] > 0 and stats["recorded"]["unet"] > 0 and stats["cache"] == "off"
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before
    # every LoRA'd weight carries exactly one patch: an ordinary LoRA patch (no replaced weight), rank 4 + 4
    FusedLoRA = patches(env).FusedLoRA
    import comfy.weight_adapter as wa
    unet_w, info = patches(env).fused_of(fm)
    text_w, _ = patches(env).fused_of(fc.patcher)
    assert len(unet_w) == 192 and len(text_w) == 2 * 6
    for patcher, keys in ((fm, unet_w), (fc.patcher, text_w)):
        for k in keys:
            (entry,) = patcher.patches[k]
            assert isinstance(entry[1], FusedLoRA) and isinstance(entry[1], wa.LoRAAdapter) and entry[0] == 1.0
            assert entry[1].weights[0].shape[1] == 8 and entry[1].weights[0].dtype == torch.float32
    assert info["base"] and [c["tokens"] for c in info["concepts"]] == [["<fa1>", "<fa2>"], ["<fb1>"]]
    patches_ = fm.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert any(isinstance(p, env.pack("nodes.glue.layerwise").LayerwiseAttn2Patch) for p in patches_)
    assert [c.edlora.tokens for c in fcs.concepts] == [["<fa1>", "<fa2>"], ["<fb1>"]]
    assert all(c.text_encoder_strength == 0 and c.unet_strength == 0 and not c.unet_factors for c in fcs.concepts)
    # the effective fused weight is W0 + up @ down (ComfyUI applies the patch when the model loads)
    key = next(k for k in unet_w if k.endswith("proj_in.weight"))
    w0 = fm.get_key_patches()[key][0][0].float().clone()
    mm.load_models_gpu([fm])
    try:
        got = effective_weight(fm.model.get_submodule(key[:-len(".weight")]))
    finally:
        mm.unload_all_models()
    up, down = unet_w[key]
    torch.testing.assert_close(got, w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape), atol=1e-5, rtol=1e-5)

    # fused CLIP vs each concept's own merged CLIP on "a <c1> <c2>" (unpadded positions): random synthetic
    # LoRAs conflict on shared inputs, so the fused encoder is a compromise, clearly closer than the base
    report = []
    for name, tokens in ((two[0], "<fa1> <fa2>"), (two[1], "<fb1>")):
        err, err_base = own_vs_fused(env, tiny, name, f"a {tokens}", fc, fcs, concepts)
        report.append((name, err, err_base))
        assert err < 0.9 * err_base, (name, err, err_base)
    with capsys.disabled():
        for name, err, err_base in report:
            print(f"\n[fusion] {name}: rel. error of 'a <c..>' fused vs own merged CLIP {err:.4f} "
                  f"(base CLIP vs own: {err_base:.4f})")
    assert torch.equal(enc.layerwise_of(enc.encode_with_concepts(clip, "a <fa1> <fa2>", concepts)[0]), base_stack)


def test_single_and_embedding_only_concepts(env, tiny, two, write_edlora):
    model, clip, _ = tiny
    _, own_clip, concepts = load_set(env, tiny, [two[1]], te=0.8, unet=0.6)
    fm, fc, fcs, stats = run(env).fuse(model, clip, concepts, settings(env), use_cache=True)
    assert stats["recorded"] == {"text": 0, "cross_kv": 0, "unet": 0}  # one concept: its LoRA, nothing recorded
    enc = env.pack("nodes.glue.layerwise")
    got = enc.layerwise_of(enc.encode_with_concepts(fc, "a <fb1>", fcs)[0])
    ref = enc.layerwise_of(enc.encode_with_concepts(own_clip, "a <fb1>", concepts)[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    emb = write_edlora("fu_emb.pth", tokens=("<fe1>",), seed=40, text_lora=False, unet_lora=False)
    _, _, mixed = load_set(env, tiny, [two[0], emb])
    fm, fc, fcs, _ = run(env).fuse(model, clip, mixed, settings(env), use_cache=False)
    assert [c.edlora.tokens for c in fcs.concepts] == [["<fa1>", "<fa2>"], ["<fe1>"]]
    _, _, only_emb = load_set(env, tiny, [emb])
    fm, fc, fcs, stats = run(env).fuse(model, clip, only_emb, settings(env), use_cache=False)
    assert not patches(env).fused_of(fm)[0] and not patches(env).fused_of(fc.patcher)[0]


def test_connected_loader_outputs_are_stripped(env, tiny, two):
    model, clip, _ = tiny
    lm, lc, concepts = load_set(env, tiny, two[:2])
    a = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    b = run(env).fuse(lm, lc, concepts, settings(env), use_cache=False)
    for pa, pb in ((a[0], b[0]), (a[1].patcher, b[1].patcher)):
        wa, wb = patches(env).fused_of(pa)[0], patches(env).fused_of(pb)[0]
        assert wa.keys() == wb.keys()
        assert all(len(pb.patches[k]) == 1 for k in wb)  # the loaders' own patches on those weights are gone
        for k in wa:
            torch.testing.assert_close(wa[k][0].flatten(1) @ wa[k][1].flatten(1),
                                       wb[k][0].flatten(1) @ wb[k][1].flatten(1), atol=1e-5, rtol=1e-4)


def test_error_and_interrupt_leave_nothing_behind(env, tiny, two):
    model, clip, _ = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    before, hooks_before = snapshot(model, clip), count_hooks(model, clip)
    ref = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)[0]
    target = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].ff.net[2]

    def interrupt(*_):
        mm.interrupt_current_processing(True)

    h = target.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    finally:
        h.remove()
        mm.interrupt_current_processing(False)
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before

    def boom(*_):
        raise RuntimeError("boom")

    h = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[1].mlp.fc2.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    finally:
        h.remove()
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before
    again = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)[0]
    wr, wa = patches(env).fused_of(ref)[0], patches(env).fused_of(again)[0]
    assert wr.keys() == wa.keys()
    for k in wr:
        torch.testing.assert_close(wa[k][0], wr[k][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(wa[k][1], wr[k][1], atol=1e-6, rtol=1e-5)


def test_bundle_round_trip_stock_lora_loader_and_checkpoint_save(env, tiny, two):
    model, clip, vae = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    fm, fc, fcs, _ = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    name = pn.save_fused_bundle(fm, fc, fcs, "fu_bundle")
    loader = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    assert name in folders.edlora_choices()
    # Load ED-LoRA: the same LoRA patches and concepts (its strengths do not apply: the bundle is merged)
    lm, lc, lcs = pn.load_edlora(model, clip, name, 0.3, 0.3)
    assert lm.model_options["mixofshow_concepts"] == lcs.labels
    for a, b in ((fm, lm), (fc.patcher, lc.patcher)):
        wa, wb = patches(env).fused_of(a)[0], patches(env).fused_of(b)[0]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k][0].flatten(1), wb[k][0].flatten(1)) and torch.equal(wa[k][1], wb[k][1])
    assert [c.edlora.tokens for c in lcs.concepts] == [c.edlora.tokens for c in fcs.concepts]
    for t, table in fcs.tables.items():
        torch.testing.assert_close(lcs.tables[t], table)
    enc = env.pack("nodes.glue.layerwise")
    torch.testing.assert_close(enc.layerwise_of(enc.encode_with_concepts(lc, "a <fa1>", lcs)[0]),
                               enc.layerwise_of(enc.encode_with_concepts(fc, "a <fa1>", fcs)[0]))
    with pytest.raises(ValueError, match="another base model"):  # a bundle on a base it was not fused on
        pn.load_edlora(*env.tiny.build_all("wide", 0)[:2], name, 1.0, 1.0)
    upper = Path(env.folder_paths.get_full_path("edloras", name)).with_name("FU_BUNDLE_UPPER.SAFETENSORS")
    shutil.copy(env.folder_paths.get_full_path("edloras", name), upper)
    _, _, ucs = loader.apply_edlora(model, clip, None, str(upper), 1.0, 1.0)  # still a bundle
    assert [c.edlora.tokens for c in ucs.concepts] == [c.edlora.tokens for c in fcs.concepts]

    # the stock Load LoRA at strength 1.0 gives the same sample as the fused MODEL/CLIP (tokens aside)
    shutil.copy(env.folder_paths.get_full_path("edloras", name), env.base / "models" / "loras" / name)
    sm, sc = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    outs = []
    for m, c in ((fm, fc), (sm, sc)):
        pos = comfy_nodes.CLIPTextEncode().encode(c, "a photo of a castle")[0]
        neg = comfy_nodes.CLIPTextEncode().encode(c, "blurry")[0]
        outs.append(comfy_nodes.common_ksampler(m, 3, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5 * float(outs[0].abs().max()), rtol=0)

    # stock Checkpoint Save on the fused MODEL/CLIP writes W0 + up @ down
    import comfy_extras.nodes_model_merging as merging
    saver = merging.CheckpointSave()
    saver.output_dir = str(env.base / "output")
    saver.save(fm, fc, vae, "fused/fu_ckpt")
    files = list((env.base / "output" / "fused").glob("fu_ckpt*.safetensors"))
    from safetensors.torch import load_file
    sd = load_file(str(files[0]))
    unet_w = patches(env).fused_of(fm)[0]
    key = next(k for k in unet_w if k.endswith("proj_in.weight"))
    w0 = fm.get_key_patches()[key][0][0].float()
    expected = w0 + (unet_w[key][0].flatten(1) @ unet_w[key][1].flatten(1)).reshape(w0.shape)
    torch.testing.assert_close(sd["model." + key].float(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="carry no fused LoRA"):
        pn.save_fused_bundle(model, clip, fcs, "fu_nothing")


def test_a_0_1_0_bundle_still_loads(env, tiny, two):
    """0.1.0 bundles hold full fused weights ("set" patches); Load ED-LoRA keeps loading them."""
    write_v1_bundle = _unit_test_module("test_fusion_bundle").write_v1_bundle  # 0.1.0's writer
    model, clip, _ = tiny
    _, _, concepts = load_set(env, tiny, two[:1])
    mk, ck = model.get_key_patches(), clip.patcher.get_key_patches()
    g = torch.Generator().manual_seed(9)
    ukey = "diffusion_model.input_blocks.1.1.proj_in.weight"
    tkey = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    fused_u = mk[ukey][0][0] + 0.1 * torch.randn(mk[ukey][0][0].shape, generator=g)
    fused_t = ck[tkey][0][0] + 0.1 * torch.randn(ck[tkey][0][0].shape, generator=g)
    path = env.base / "models" / "edloras" / "fu_v010.safetensors"
    write_v1_bundle(str(path), {ukey: fused_u}, {tkey: fused_t},
                    [{"name": "fu_a.pth", "tokens": ["<fa1>", "<fa2>"], "digest": "d"}], dict(concepts.tables))
    lm, lc, lcs = pn.load_edlora(model, clip, "fu_v010.safetensors", 1.0, 1.0)
    assert lm.patches[ukey][-1][1][0] == "set" and [c.edlora.tokens for c in lcs.concepts] == [["<fa1>", "<fa2>"]]
    mm.load_models_gpu([lm])
    try:
        torch.testing.assert_close(effective_weight(lm.model.get_submodule(ukey[:-7])), fused_u.float())
    finally:
        mm.unload_all_models()
    lc.load_model()
    try:
        # (the text encoder may compute in float16 here: its rounding)
        torch.testing.assert_close(effective_weight(lc.cond_stage_model.get_submodule(tkey[:-7])), fused_t.float(),
                                   atol=1e-3, rtol=1e-3)
    finally:
        mm.unload_all_models()
    with pytest.raises(ValueError, match="0.1.0 bundles hold full weights"):
        pn.save_fused_bundle(lm, lc, lcs, "fu_again")


def test_node_in_a_prompt_old_and_new_inputs(env, two):
    from comfy_env import execution_error, run_prompt

    def graph(**extra):
        return {
            "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
            "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                  "edlora_name": two[0], "text_encoder_strength": 1.0,
                                                                  "unet_strength": 1.0}},
            "3": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                                  "edlora_name": two[1], "text_encoder_strength": 1.0,
                                                                  "unet_strength": 1.0, "concepts": ["2", 2]}},
            "4": {"class_type": "MixOfShowGradientFusion", "inputs": {  # 0.1.0's inputs, in 0.1.0's order
                "model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 2], "steps": 1, "width": 64, "height": 64,
                "seed": 0, "solver": "closed_form", "cache": False, **extra}},
            "5": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["4", 1], "concepts": ["4", 2],
                                                                  "text": "a <fa1> <fa2> and <fb1>"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                       "latent_image": ["7", 0], "seed": 0, "steps": 1, "cfg": 5.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "9": {"class_type": "MixOfShowSaveFusedBundle", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                       "concepts": ["4", 2],
                                                                       "filename_prefix": "fu_prompt"}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        }

    for extra in ({}, {"sampler_name": "euler", "scheduler": "karras", "ridge": 0.001}):
        executor, _ = run_prompt(graph(**extra))
        assert executor.success, execution_error(executor) or executor.validation
    executor, _ = run_prompt(graph(sampler_name="not_a_sampler"))
    assert not executor.success and "sampler_name" in str(executor.validation)


def test_fused_model_accepts_regions_encoded_with_the_fused_concepts(env, tiny, write_edlora):
    model, clip, _ = tiny
    a = write_edlora("fu_reg_a.pth", tokens=("<ra1>",), seed=80)
    b = write_edlora("fu_reg_b.pth", tokens=("<rb1>",), seed=81)
    _, _, concepts = load_set(env, tiny, [a, b])
    fm, fc, fcs, _ = run(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    assert fm.model_options["mixofshow_concepts"] == fcs.labels == concepts.labels
    enc = env.pack("nodes.glue.layerwise").encode_with_concepts
    regional = env.pack("nodes.glue.regional")
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    regions = pn.region(enc(fc, "a <ra1>", fcs), enc(fc, "blurry", fcs), mask)
    regions = pn.region(enc(fc, "a <rb1>", fcs), enc(fc, "blurry", fcs), 1 - mask, regions)
    patched = regional.install_regions(fm, regions)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = comfy_nodes.common_ksampler(patched, 1, 1, 5.0, "euler", "normal", enc(fc, "two people", fcs),
                                      enc(fc, "blurry", fcs), latent)[0]["samples"]
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- plain LoRAs as concepts (issue 8)

def write_kohya_lora(env, name, seed, rank=4, alpha=2.0, text=True, locon=False):
    """A plain LoRA for the tiny model in kohya's key layout (lora_unet_<diffusers module>, lora_te_…)."""
    from synthetic import text_module_shapes, unet_module_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    shapes = {f"lora_unet_{m.replace('.', '_')}": s for m, s in unet_module_shapes(32, whole_block=False).items()}
    if text:
        shapes.update({f"lora_te_{m.replace('.', '_')}": s for m, s in text_module_shapes(2, 512).items()})
    if locon:
        shapes["lora_unet_down_blocks_0_resnets_0_conv1"] = (32, 32, 3, 3)
    for key, shape in shapes.items():
        kernel = tuple(shape[2:])
        sd[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.5
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=g) / shape[1] ** 0.5
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(env.base / "models" / "loras" / name))
    return name


def lora_concept(env, model, clip, concepts, name, words, strength=1.0):
    en = env.pack("nodes.glue.loading")
    path = env.folder_paths.get_full_path_or_raise("loras", name)
    return en.apply_lora_concept(model, clip, concepts, path, words, strength, strength)


def test_two_plain_loras_and_an_ed_lora_fuse_better_than_weight_summing(env, tiny, two, capsys):
    """Issue 8: LoRAs as concepts fuse like ED-LoRAs. On the same recordings the closed form's objective
    is at most L-BFGS's, and each concept's own layers reproduce it on its recordings far better than
    plain weight summing (relative output error of those layers, fused vs summed)."""
    model, clip, _ = tiny
    a = write_kohya_lora(env, "fu_plain_a.safetensors", seed=61)
    b = write_kohya_lora(env, "fu_plain_b.safetensors", seed=62, text=False, alpha=4.0)
    m, c, concepts = lora_concept(env, model, clip, None, a, "ohwx woman")
    m, c, concepts = lora_concept(env, m, c, concepts, b, "sks man")
    m, c, concepts = load_set(env, tiny, [two[0]], model=m, clip=c, concepts=concepts)
    rows = {}

    def tap(stage, i, group, x, channels_first):
        x = x.flatten(2).transpose(1, 2) if channels_first else x
        rows.setdefault((i, group), []).append(x.reshape(-1, x.shape[-1]).double())

    s = settings(env, ridge=0.0)
    fm, fc, fcs, stats = run(env).fuse(model, clip, concepts, s, use_cache=False, keep_problems=True, tap=tap)
    assert [cc.trigger_words for cc in fcs.concepts] == ["ohwx woman", "sks man", ""]
    solver = env.pack("fusion.merge.solver")
    result = stats["result"]
    plan = run(env).plan_for(model, clip, concepts)
    # the closed form's objective on these recordings is at most the reference optimiser's
    errors = own_layer_errors(solver, result, plan, model, clip, lambda i, t: rows[(i, t.group)],
                              lambda stage: 200 if stage == "unet" else 500)
    check_fused_beats_summing(errors, ["plain A (ohwx woman)", "plain B (sks man)", "ED-LoRA fu_a"],
                              "fusion, issue 8", capsys)


def test_locon_conv_layers_are_refused_naming_file_and_module(env, tiny, two):
    model, clip, _ = tiny
    name = write_kohya_lora(env, "fu_locon.safetensors", seed=63, locon=True)
    m, c, concepts = lora_concept(env, model, clip, None, name, "zxc cat")
    m, c, concepts = load_set(env, tiny, [two[1]], model=m, clip=c, concepts=concepts)
    with pytest.raises(ValueError, match=r"fu_locon\.safetensors.*3x3 convolution "
                                         r"'diffusion_model\.input_blocks\.1\.0\.in_layers\.2\.weight' \(LoCon\)"):
        run(env).fuse(model, clip, concepts, settings(env), use_cache=False)


def test_the_recorder_hands_the_heap_back_after_every_unet_sampling_step(env, tiny, write_edlora, monkeypatch):
    """Issue 22: the free heap a UNet step leaves between the kept rows and Grams is handed back after every
    sampling step of every concept, not only after each recording (glibc; the real helper still runs)."""
    names = [write_edlora(f"fu_trim_{i}.pth", tokens=(f"<t{i}a>", f"<t{i}b>"), seed=90 + i) for i in range(2)]
    recording = env.pack("nodes.glue.fusion_recording")
    calls, real = [], recording.release_free_heap

    def counted() -> bool:
        calls.append(1)
        return real()

    monkeypatch.setattr(recording, "release_free_heap", counted)
    _model, _clip, concepts = load_set(env, tiny, names)
    run(env).fuse(tiny[0], tiny[1], concepts, settings(env), use_cache=False)
    # per concept: one per UNet step, one after each of the three recordings
    assert len(calls) == 2 * (STEPS + 3), len(calls)


def test_each_groups_accumulator_is_bounded_whatever_the_number_of_concepts(env, tiny, write_edlora):
    """Issue 22: after a whole fusion, what each input group's FoldedInputs holds is at most its Gram (in² float32)
    plus M (r×in) per concept and LoRA'd module and the current concept's D: from 2 to 5 concepts only the M grow,
    and a group folded into its Gram holds the same Gram bytes either way. The recorder hands freed heap back
    (glibc)."""
    names = [write_edlora(f"fu_mem_{i}.pth", tokens=(f"<m{i}a>", f"<m{i}b>"), seed=70 + i) for i in range(5)]

    def held(n):
        model, clip, concepts = load_set(env, tiny, names[:n])
        stats = run(env).fuse(tiny[0], tiny[1], concepts, settings(env), use_cache=False, keep_problems=True)[3]
        out = {}
        for layer in stats["result"].solved:
            acc = layer.inputs
            held = acc.held_bytes()
            out[layer.target.group] = (acc.in_features, held["rows"] + held["gram"], held["downs"], held["rhs"],
                                       acc.in_row_mode)
        return out

    two, five = held(2), held(5)
    assert two.keys() == five.keys() and len(two) > 10
    for group, (width, big5, downs5, rhs5, rows5) in five.items():
        _, big2, downs2, rhs2, rows2 = two[group]
        assert big5 <= width * width * 4, group  # rows are kept only while they cost no more than the Gram
        if not rows2 and not rows5:
            assert big5 == big2, group  # the same Gram (its upper-triangle strips) whatever the number of concepts
            assert rhs5 * 2 == rhs2 * 5 and downs5 == downs2, group  # M per concept; D of the current one only
    assert any(not v[-1] for v in five.values()) and any(v[-1] for v in five.values())
    assert env.pack("fusion.merge.heap").release_free_heap() is True
