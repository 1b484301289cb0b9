"""What the recorder feeds the solver, inside ComfyUI: stage 2 reads the fused text encoder at each concept's
token positions (ED-LoRA tokens, trigger words, embedding: vectors), stage 3 samples with the fused k/v
and the concept's own LoRA elsewhere, concept i with noise seed + i, on the reference schedule or a
ComfyUI sampler; text rows weigh every concept the same; the node reports one progress bar and its
stage as text."""
import os
import sys
import types

import comfy.sample
import comfy.utils
import numpy as np
import pytest
import torch
from comfy import weight_adapter
from fusion_graphs import fusion_and_save
from safetensors.torch import save_file


@pytest.fixture(autouse=True)
def no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXOFSHOW_FUSION_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trio(env, tiny, write_edlora):
    en = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    model, clip, _ = tiny
    m, c, concepts = model, clip, None
    for name, tokens, seed in (("re_a.pth", ("<ra1>", "<ra2>"), 70), ("re_b.pth", ("<rb1>",), 71),
                               ("re_c.pth", ("<rc1>",), 72)):
        write_edlora(name, tokens=tokens, seed=seed)
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 0.8)
    return concepts


def settings(env, **kw):
    kw = {"steps": 2, "width": 64, "height": 64, "seed": 5, **kw}
    return env.pack("fusion.merge.gradient_fusion").FusionSettings(**kw)


def recorder(env, tiny, concepts, s):
    model, clip, _ = tiny
    plan = env.pack("nodes.glue.fusion_run").plan_for(model, clip, concepts)
    return env.pack("nodes.glue.fusion_recording").ComfyRecorder(model, clip, concepts, s, plan), plan


def test_stage_2_reads_the_fused_text_encoder_at_the_concept_positions(env, tiny, trio):
    model, clip, _ = tiny
    rows = {}

    def tap(stage, i, group, x, channels_first):
        if stage == "cross_kv":
            rows.setdefault((i, group), []).append(x)

    fm, fc, fcs, _ = env.pack("nodes.glue.fusion_run").fuse(model, clip, trio, settings(env), use_cache=False, tap=tap)
    enc = env.pack("nodes.glue.layerwise")
    gf = env.pack("fusion.merge.gradient_fusion")
    layers = {t.group: t.layer for t in env.pack("nodes.glue.fusion_run").plan_for(model, clip, trio).targets
              if t.stage == "cross_kv"}
    expected_positions = {0: ([4, 5, 6], [1, 2, 3]), 1: ([4, 5], [1, 2])}  # <ra1> <ra2> / <rb1>, then the end token
    for i in (0, 1):
        words = trio.concepts[i].prompt_words
        for prompt, positions in zip(gf.concept_prompts(words), expected_positions[i], strict=True):
            stack = enc.layerwise_of(enc.encode_with_concepts(fc, prompt, fcs)[0])[0]
            for group, layer in layers.items():
                got = rows[(i, group)][gf.concept_prompts(words).index(prompt)]
                torch.testing.assert_close(got, stack[layer, positions].float(), atol=1e-5, rtol=1e-5)


def test_positions_of_trigger_words_and_embeddings(env, sd15, trio):
    """Trigger words are found with ComfyUI's tokenizer however many tokens (BPE pieces, embedding
    vectors) it makes of them (the full-size CLIP: it has an embeddings folder)."""
    _, clip = sd15
    folder = env.folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(folder, exist_ok=True)
    save_file({"emb_params": torch.randn(3, 768) * 0.02}, os.path.join(folder, "re_ti3.safetensors"))
    positions = env.pack("nodes.glue.fusion_recording").concept_positions
    bpe = clip.tokenizer.clip_l.tokenizer("ohwx woman")["input_ids"][1:-1]  # the raw tokenizer: how many pieces
    assert positions(clip, trio, "photo of a ohwx woman", "ohwx woman") == list(range(4, 4 + len(bpe) + 1))
    assert positions(clip, trio, "ohwx woman", "ohwx woman") == list(range(1, 1 + len(bpe) + 1))
    # embedding:re_ti3 is three vectors, then "woman" is one token, then the end token
    assert positions(clip, trio, "photo of a embedding:re_ti3 woman", "embedding:re_ti3 woman") == [4, 5, 6, 7, 8]
    assert positions(clip, trio, "photo of a <ra1> <ra2>", "<ra1> <ra2>") == [4, 5, 6]
    with pytest.raises(ValueError, match="longer than one"):
        positions(clip, trio, "photo of a " + "word " * 80, "word " * 80)


def test_stage_3_samples_with_the_fused_kv_and_the_concepts_own_lora_elsewhere(env, tiny, trio):
    rec, plan = recorder(env, tiny, trio, settings(env))
    kv = {t.key: (torch.randn(t.shape[0], 3), torch.randn(3, t.shape[1])) for t in plan.targets
          if t.stage == "cross_kv"}
    model_1 = rec._model(1, kv)
    FusedLoRA = env.pack("nodes.glue.fused_patches").FusedLoRA
    own = trio.concepts[1]
    for t in plan.targets:
        if t.part != "model":
            continue
        (entry,) = model_1.patches[t.key]
        if t.stage == "cross_kv":  # the stage-2 result, not the concept's own k/v LoRA
            assert isinstance(entry[1], FusedLoRA) and torch.equal(entry[1].weights[0], kv[t.key][0])
        else:  # the concept's own LoRA at its UNet strength
            assert type(entry[1]) is weight_adapter.LoRAAdapter and entry[0] == 0.8
            assert torch.equal(entry[1].weights[0], own.unet_factors[t.key][0])
    assert not model_1.patches.keys() - plan.keys("model")


def test_each_concept_gets_its_own_noise_and_the_reference_schedule(env, tiny, trio, monkeypatch):
    model, clip, _ = tiny
    seeds, custom, plain = [], [], []
    real_noise, real_custom, real_sample = comfy.sample.prepare_noise, comfy.sample.sample_custom, comfy.sample.sample

    def noise(latent, seed, *a, **k):
        seeds.append(seed)
        return real_noise(latent, seed, *a, **k)

    def sample_custom(model_, noise_, cfg, sampler, sigmas, *a, **k):
        custom.append((cfg, sampler, sigmas.clone()))
        return real_custom(model_, noise_, cfg, sampler, sigmas, *a, **k)

    def sample(model_, noise_, steps, cfg, sampler_name, scheduler, *a, **k):
        plain.append((steps, cfg, sampler_name, scheduler))
        return real_sample(model_, noise_, steps, cfg, sampler_name, scheduler, *a, **k)

    monkeypatch.setattr(comfy.sample, "prepare_noise", noise)
    monkeypatch.setattr(comfy.sample, "sample_custom", sample_custom)
    monkeypatch.setattr(comfy.sample, "sample", sample)
    run = env.pack("nodes.glue.fusion_run")
    run.fuse(model, clip, trio, settings(env, seed=7), use_cache=False)
    assert seeds == [7, 8, 9] and not plain and len(custom) == 3
    cfg, sampler, sigmas = custom[0]
    assert cfg == 1.0 and sampler.sampler_function.__name__ == "sample_dpmpp_2m"
    # the reference's timesteps: diffusers' linspace spacing, through the model's own noise schedule
    ms = model.get_model_object("model_sampling")
    timesteps = np.linspace(0, 999, 2 + 1).round()[::-1][:-1].astype(np.int64)
    expected = torch.cat([ms.sigmas[torch.from_numpy(timesteps.copy())].float(), torch.zeros(1)])
    torch.testing.assert_close(sigmas, expected)
    seeds.clear()
    run.fuse(model, clip, trio, settings(env, seed=2**64 - 2, sampler="euler", scheduler="karras"), use_cache=False)
    assert seeds == [2**64 - 2, 2**64 - 1, 0] and plain == [(2, 1.0, "euler", "karras")] * 3


def test_text_rows_weigh_every_concept_as_sixteen_copies(env, tiny, trio):
    """Deduplicated, weighted text rows keep the Gram of all 16 layer-wise copies (ED-LoRA); a plain LoRA's one
    encode is weighted as 16 copies."""
    model, clip, _ = tiny
    rec, plan = recorder(env, tiny, trio, settings(env))
    group = next(t.group for t in plan.targets if t.stage == "text" and t.group.endswith("mlp.fc1"))
    got = []
    rec.record("text", 0, {}, {group: None}, lambda g, x, cf: got.append(x), lambda *a: None)
    raw = []
    module = rec._own_clip(0).cond_stage_model.get_submodule(group)
    h = module.register_forward_pre_hook(lambda m, args: raw.append(args[0].detach().clone()))
    enc = env.pack("nodes.glue.layerwise")
    try:
        for prompt, n in (("photo of a <ra1> <ra2>", 7), ("<ra1> <ra2>", 4)):
            enc.encode_with_concepts(rec._own_clip(0), prompt, trio)
            raw[-1] = raw[-1][:16, :n].reshape(-1, raw[-1].shape[-1])
    finally:
        h.remove()
    x = torch.cat(raw).double()
    (rows,) = got
    # the 16 copies agree before the concept tokens: start, "photo of a" kept once; <ra1> <ra2> end per copy
    assert (x.shape[0], rows.shape[0]) == (16 * (7 + 4), 4 + 16 * 3 + 16 * 3)
    torch.testing.assert_close(rows.double().T @ rows.double(), x.T @ x, atol=1e-3, rtol=1e-4)

    # a plain LoRA (trigger words): one plain encode per prompt, weighted 16
    Concept = env.pack("fusion.prompts.concepts").Concept
    a = trio.concepts[0]
    plain_set = env.pack("fusion.prompts.concepts").ConceptSet().add(
        Concept(env.pack("fusion.files.edlora").EDLoRA(name="plain.safetensors", digest="p"), 1.0, 1.0,
                trigger_words="ohwx woman", unet_factors=a.unet_factors, text_factors=a.text_factors)
    ).add(trio.concepts[1])
    rec = env.pack("nodes.glue.fusion_recording").ComfyRecorder(model, clip, plain_set, settings(env), plan)
    got.clear()
    rec.record("text", 0, {}, {group: None}, lambda g, x, cf: got.append(x), lambda *a: None)
    raw.clear()
    h = module.register_forward_pre_hook(lambda m, args: raw.append(args[0].detach().clone()))
    try:
        for prompt in ("photo of a ohwx woman", "ohwx woman"):
            n = len(clip.tokenizer.clip_l.tokenizer(prompt)["input_ids"])
            enc.encode_with_concepts(rec._own_clip(0), prompt, plain_set)
            raw[-1] = raw[-1][:1, :n].reshape(-1, raw[-1].shape[-1])
    finally:
        h.remove()
    x = torch.cat(raw).double()
    (rows,) = got
    torch.testing.assert_close(rows.double().T @ rows.double(), 16 * x.T @ x, atol=1e-3, rtol=1e-4)


class FakePromptServer:
    instance = None

    def __init__(self):
        self.texts = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))


def test_the_node_shows_one_progress_bar_and_its_stage_as_text(env, trio, monkeypatch):
    """Through the real executor: one progress bar (one total, values rising to it) and the stage text sent
    for the node's own id (the browser tier checks the frontend renders it)."""
    from comfy_env import execution_error, run_prompt

    server = FakePromptServer()
    FakePromptServer.instance = server
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=FakePromptServer))
    bars = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: bars.append((value, total, node_id)))
    graph = fusion_and_save(("re_a.pth", "re_b.pth"), steps=3, size=64, prefix="re_prog")
    executor, _ = run_prompt(graph)
    assert executor.success, execution_error(executor)
    mine = [(v, t) for v, t, node in bars if node == "4"]
    assert mine and len({t for _v, t in mine}) == 1  # one bar over the whole fusion
    values = [v for v, _t in mine]
    assert values == sorted(values) and values[-1] == mine[0][1]
    texts = [t for node, t in server.texts if node == "4"]
    for expected in ("text encoder 1/2", "text encoder 2/2", "cross-attention k/v 1/2",
                     "UNet: concept 1 of 2, step 1/3", "UNet: concept 2 of 2, step 3/3", "solving 204/204 layers",
                     "fused 2 concepts into 204 layers"):
        assert expected in texts, expected
    assert all(node == "4" for node, _ in server.texts)
