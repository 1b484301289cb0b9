"""Issue 4: gradient fusion node, fused bundles and Checkpoint Save, in a real in-process ComfyUI."""
import os

import pytest
import torch

import comfy.model_management as mm
import nodes as comfy_nodes
import pack_nodes as pn

STEPS, SIZE = 2, 64


@pytest.fixture(autouse=True)
def fusion_cache(tmp_path, monkeypatch):
    """Each test gets its own empty fusion cache folder."""
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fn(env):
    return env.pack("nodes.fusion_nodes")


def settings(env, **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 5)
    return env.pack("fusion.gradient_fusion").FusionSettings(**kw)


def load_set(env, tiny, names, te=1.0, unet=1.0, model=None, clip=None):
    model0, clip0, _ = tiny
    model, clip, concepts = model or model0, clip or clip0, None
    en = env.pack("nodes.edlora_nodes")
    for name in names:
        model, clip, concepts = en.apply_edlora(model, clip, concepts, en.edlora_path(name), te, unet)
    return model, clip, concepts


def snapshot(model, clip):
    return ({k: [id(p[1]) for p in v] for k, v in model.patches.items()},
            {k: [id(p[1]) for p in v] for k, v in clip.patcher.patches.items()})


def count_hooks(model, clip):
    mods = list(model.model.diffusion_model.modules()) + list(clip.cond_stage_model.modules())
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def own_vs_fused(env, tiny, name, text, fc, fcs, concepts):
    """Relative errors (fused vs own merged CLIP, base vs own) of the layer-wise stack, unpadded positions."""
    model, clip, _ = tiny
    enc = env.pack("nodes.layerwise")
    gf = env.pack("fusion.gradient_fusion")
    _, own_clip, own = load_set(env, tiny, [name])
    tokens = enc.tokenize_with_concepts(clip, text, own)[0]["l"][0]
    n = next(j for j, t in enumerate(tokens) if j > 0 and t[0] == 49407) + 1
    ref = enc.layerwise_of(enc.encode_with_concepts(own_clip, text, own)[0])[:, :, :n]
    got = enc.layerwise_of(enc.encode_with_concepts(fc, text, fcs)[0])[:, :, :n]
    base = enc.layerwise_of(enc.encode_with_concepts(clip, text, concepts)[0])[:, :, :n]
    return gf.relative_error(got, ref), gf.relative_error(base, ref)


def test_identical_loras_are_reproduced(env, tiny, write_edlora, capsys):
    """Two ED-LoRAs with the same LoRA (same seed, other token names): fusion reproduces each one's own
    encoder on its recorded prompts."""
    model, clip, _ = tiny
    a = write_edlora("fu_same_a.pth", tokens=("<ga1>",), seed=50)
    b = write_edlora("fu_same_b.pth", tokens=("<gb1>",), seed=50)
    _, _, concepts = load_set(env, tiny, [a, b])
    fm, fc, fcs, _ = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    for name, tok in ((a, "<ga1>"), (b, "<gb1>")):
        for text in (f"photo of a {tok}", tok):
            err, err_base = own_vs_fused(env, tiny, name, text, fc, fcs, concepts)
            with capsys.disabled():
                print(f"\n[fusion] identical LoRAs, {text!r}: rel. error {err:.2e} (base {err_base:.3f})")
            assert err < 1e-3


@pytest.fixture(scope="module")
def two(env, write_edlora):
    a = write_edlora("fu_a.pth", tokens=("<fa1>", "<fa2>"), seed=21)
    b = write_edlora("fu_b.pth", tokens=("<fb1>",), seed=22)
    c = write_edlora("fu_c.safetensors", tokens=("<fc1>", "<fc2>"), seed=23)
    return a, b, c


def test_bad_inputs(env, tiny, two, write_edlora):
    model, clip, _ = tiny
    fuse = fn(env).fuse
    with pytest.raises(ValueError, match="at least one concept"):
        fuse(model, clip, None, settings(env))
    ConceptSet = env.pack("fusion.concepts").ConceptSet
    with pytest.raises(ValueError, match="at least one concept"):
        fuse(model, clip, ConceptSet(), settings(env))
    # same token in two files -> error naming both (surfaces from the concept set)
    dup = write_edlora("fu_dup.pth", tokens=("<fa1>",), seed=30)
    with pytest.raises(ValueError, match="fu_a.pth.*fu_dup.pth"):
        load_set(env, tiny, [two[0], dup])
    # an ED-LoRA for another base -> error before any work (no hook ever fires)
    other = write_edlora("fu_other.pth", tokens=("<fo1>",), seed=31, model_channels=64)
    good = load_set(env, tiny, [two[0]])[2]
    bad = good.add(env.pack("fusion.concepts").Concept(
        env.pack("fusion.edlora").load_edlora(str(env.base / "models" / "edloras" / other)), 1.0, 1.0))
    calls = []
    h = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.register_forward_pre_hook(
        lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="fu_other.pth"):
            fuse(model, clip, bad, settings(env))
    finally:
        h.remove()
    assert calls == []


def test_fusion_reproduces_each_concept_and_leaves_inputs_alone(env, tiny, two, capsys):
    model, clip, _ = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    before = snapshot(model, clip)
    hooks_before = count_hooks(model, clip)
    enc = env.pack("nodes.layerwise")
    base_stack = enc.layerwise_of(enc.encode_with_concepts(clip, "a <fa1> <fa2>", concepts)[0])

    fm, fc, fcs, stats = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    assert stats["recorded"]["text"] > 0 and stats["recorded"]["unet"] > 0
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before
    # every LoRA'd module fused, no LoRA left
    unet_w, _ = fn(env).fused_weights_of(fm)
    text_w, _ = fn(env).fused_weights_of(fc.patcher)
    assert len(unet_w) == 192 and len(text_w) == 2 * 6
    assert all(len(v) == 1 for k, v in fm.patches.items() if k in unet_w)
    patches = fm.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert any(isinstance(p, env.pack("nodes.layerwise").LayerwiseAttn2Patch) for p in patches)
    assert [c.edlora.tokens for c in fcs.concepts] == [["<fa1>", "<fa2>"], ["<fb1>"]]
    assert all(c.text_encoder_strength == 0 and c.unet_strength == 0 and not c.edlora.unet
               for c in fcs.concepts)

    # fused CLIP vs each concept's own merged CLIP on "a <c1> <c2>" (unpadded positions: start..end token).
    # Random synthetic LoRAs conflict on shared inputs (start token, "photo of a"), so the fused encoder is a
    # compromise: it must be clearly closer to each concept's own encoder than the base encoder is.
    report = []
    for name, tokens in ((two[0], "<fa1> <fa2>"), (two[1], "<fb1>")):
        err, err_base = own_vs_fused(env, tiny, name, f"a {tokens}", fc, fcs, concepts)
        report.append((name, err, err_base))
        assert err < 0.9 * err_base, (name, err, err_base)
    with capsys.disabled():
        for name, err, err_base in report:
            print(f"\n[fusion] {name}: rel. error of 'a <c..>' fused vs own merged CLIP {err:.4f} "
                  f"(base CLIP vs own: {err_base:.4f})")
    # base CLIP still encodes as before
    assert torch.equal(enc.layerwise_of(enc.encode_with_concepts(clip, "a <fa1> <fa2>", concepts)[0]), base_stack)


def test_single_and_embedding_only_concepts(env, tiny, two, write_edlora):
    model, clip, _ = tiny
    _, own_clip, concepts = load_set(env, tiny, [two[1]], te=0.8, unet=0.6)
    fm, fc, fcs, stats = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    assert stats["recorded"] == {"text": 0, "cross_kv": 0, "unet": 0}  # one concept: merged, nothing recorded
    enc = env.pack("nodes.layerwise")
    got = enc.layerwise_of(enc.encode_with_concepts(fc, "a <fb1>", fcs)[0])
    ref = enc.layerwise_of(enc.encode_with_concepts(own_clip, "a <fb1>", concepts)[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    emb = write_edlora("fu_emb.pth", tokens=("<fe1>",), seed=40, text_lora=False, unet_lora=False)
    _, _, mixed = load_set(env, tiny, [two[0], emb])
    fm, fc, fcs, _ = fn(env).fuse(model, clip, mixed, settings(env), use_cache=False)
    assert [c.edlora.tokens for c in fcs.concepts] == [["<fa1>", "<fa2>"], ["<fe1>"]]
    _, _, only_emb = load_set(env, tiny, [emb])
    fm, fc, fcs, stats = fn(env).fuse(model, clip, only_emb, settings(env), use_cache=False)
    assert not fn(env).fused_weights_of(fm)[0] and not fn(env).fused_weights_of(fc.patcher)[0]


def test_connected_loader_outputs_are_stripped(env, tiny, two):
    model, clip, _ = tiny
    lm, lc, concepts = load_set(env, tiny, two[:2])
    a = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    b = fn(env).fuse(lm, lc, concepts, settings(env), use_cache=False)
    wa, wb = fn(env).fused_weights_of(a[0])[0], fn(env).fused_weights_of(b[0])[0]
    ta, tb = fn(env).fused_weights_of(a[1].patcher)[0], fn(env).fused_weights_of(b[1].patcher)[0]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)


def test_error_and_interrupt_leave_nothing_behind(env, tiny, two):
    model, clip, _ = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    before, hooks_before = snapshot(model, clip), count_hooks(model, clip)
    ref = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)[0]
    target = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].ff.net[2]

    def interrupt(*_):
        mm.interrupt_current_processing(True)

    h = target.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    finally:
        h.remove()
        mm.interrupt_current_processing(False)
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before

    def boom(*_):
        raise RuntimeError("boom")

    h = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[1].mlp.fc2.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    finally:
        h.remove()
    assert snapshot(model, clip) == before and count_hooks(model, clip) == hooks_before

    again = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)[0]
    wr, wa = fn(env).fused_weights_of(ref)[0], fn(env).fused_weights_of(again)[0]
    assert wr.keys() == wa.keys()
    for k in wr:
        torch.testing.assert_close(wa[k], wr[k], atol=1e-6, rtol=1e-5)


def test_cache_hits_and_per_concept_text_statistics(env, tiny, two, fusion_cache):
    model, clip, _ = tiny
    _, _, ab = load_set(env, tiny, two[:2])
    first = fn(env).fuse(model, clip, ab, settings(env))
    calls = []
    mods = [clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1,
            model.model.diffusion_model.middle_block[1].proj_in]
    hs = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in mods]
    try:
        second = fn(env).fuse(model, clip, ab, settings(env))
    finally:
        for h in hs:
            h.remove()
    assert second[3]["cache"] == "hit" and calls == []
    w1, w2 = fn(env).fused_weights_of(first[0])[0], fn(env).fused_weights_of(second[0])[0]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # other settings: a new fusion
    assert fn(env).fuse(model, clip, ab, settings(env, seed=6))[3]["cache"] == "miss"
    # {A, B, C} after {A, B}: stage-1 recordings of A and B are reused, only C is recorded
    _, _, abc = load_set(env, tiny, two)
    stats = fn(env).fuse(model, clip, abc, settings(env))[3]
    per_concept = first[3]["recorded"]["text"] / 2
    assert stats["cache"] == "miss" and stats["recorded"]["text"] == per_concept
    assert any(f.endswith(".rows") for f in os.listdir(fusion_cache))


def test_bundle_round_trip_and_checkpoint_save(env, tiny, two):
    model, clip, vae = tiny
    _, _, concepts = load_set(env, tiny, two[:2])
    fm, fc, fcs, _ = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    name = pn.save_fused_bundle(fm, fc, fcs, "fu_bundle")
    loader = env.pack("nodes.edlora_nodes")
    assert name in loader.edlora_choices()
    # Load ED-LoRA loads bundles (its strengths do not apply: the bundle is already merged)
    lm, lc, lcs = pn.load_edlora(model, clip, name, 0.3, 0.3)
    assert lm.model_options["mixofshow_concepts"] == lcs.labels
    for a, b in ((fm, lm), (fc.patcher, lc.patcher)):
        wa, wb = fn(env).fused_weights_of(a)[0], fn(env).fused_weights_of(b)[0]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [c.edlora.tokens for c in lcs.concepts] == [c.edlora.tokens for c in fcs.concepts]
    for t, table in fcs.tables.items():
        torch.testing.assert_close(lcs.tables[t], table)
    enc = env.pack("nodes.layerwise")
    torch.testing.assert_close(enc.layerwise_of(enc.encode_with_concepts(lc, "a <fa1>", lcs)[0]),
                               enc.layerwise_of(enc.encode_with_concepts(fc, "a <fa1>", fcs)[0]))
    with pytest.raises(ValueError, match="another base model"):  # a bundle on a base it was not fused on
        pn.load_edlora(*env.tiny.build_all("wide", 0)[:2], name, 1.0, 1.0)

    # stock Checkpoint Save on the fused MODEL/CLIP
    import comfy_extras.nodes_model_merging as merging
    saver = merging.CheckpointSave()
    saver.output_dir = str(env.base / "output")
    saver.save(fm, fc, vae, "fused/fu_ckpt")
    files = list((env.base / "output" / "fused").glob("fu_ckpt*.safetensors"))
    assert files
    from safetensors.torch import load_file
    sd = load_file(str(files[0]))
    key = next(k for k in fn(env).fused_weights_of(fm)[0] if k.endswith("proj_in.weight"))
    torch.testing.assert_close(sd["model." + key].float(), fn(env).fused_weights_of(fm)[0][key].float())


def test_node_in_a_prompt(env, two):
    from comfy_env import execution_error, run_prompt
    graph = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "edlora_name": two[0], "text_encoder_strength": 1.0,
                                                              "unet_strength": 1.0}},
        "3": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                              "edlora_name": two[1], "text_encoder_strength": 1.0,
                                                              "unet_strength": 1.0, "concepts": ["2", 2]}},
        "4": {"class_type": "MixOfShowGradientFusion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 2], "steps": 1, "width": 64, "height": 64,
            "seed": 0, "solver": "closed_form", "cache": False}},
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
    executor, _ = run_prompt(graph)
    assert executor.success, execution_error(executor) or executor.validation


def test_fused_model_accepts_regions_encoded_with_the_fused_concepts(env, tiny, write_edlora):
    model, clip, _ = tiny
    a = write_edlora("fu_reg_a.pth", tokens=("<ra1>",), seed=80)
    b = write_edlora("fu_reg_b.pth", tokens=("<rb1>",), seed=81)
    _, _, concepts = load_set(env, tiny, [a, b])
    fm, fc, fcs, _ = fn(env).fuse(model, clip, concepts, settings(env), use_cache=False)
    assert fm.model_options["mixofshow_concepts"] == fcs.labels == concepts.labels
    enc = env.pack("nodes.layerwise").encode_with_concepts
    regional = env.pack("nodes.regional_attention")
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    regions = pn.region(enc(fc, "a <ra1>", fcs), enc(fc, "blurry", fcs), mask)
    regions = pn.region(enc(fc, "a <rb1>", fcs), enc(fc, "blurry", fcs), 1 - mask, regions)
    patched = regional.install_regions(fm, regions)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = comfy_nodes.common_ksampler(patched, 1, 1, 5.0, "euler", "normal", enc(fc, "two people", fcs),
                                      enc(fc, "blurry", fcs), latent)[0]["samples"]
    assert torch.isfinite(out).all()
