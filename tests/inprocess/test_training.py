"""Issue 21: Train ED-LoRA inside a real ComfyUI on the tiny SD1.5-layout model (16 cross-attention layers, SD1.5
key names) with a synthetic training set (coloured shapes with masks, made by tests/support/synthetic.py).

The loss on a fixed probe (fixed latent, noise and timestep, computed through ComfyUI's own sampler) falls; the base
weights and the CLIP's token table are bit-identical afterwards and nothing is left on the modules; only the LoRA
factors and the concept rows change; a norm threshold of 0 freezes the rows after the first step; the same seed
gives the same curve, with and without gradient checkpointing; Save -> Load ED-LoRA gives the same conditioning and
noise prediction; an interrupt leaves the next prompt's output unchanged; bad inputs are refused before step 1."""
from __future__ import annotations

import json
import math

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import pack_nodes as pn
import pytest
import torch
from comfy_env import execution_error, node, run_prompt
from PIL import Image
from safetensors import safe_open
from synthetic import training_images

import nodes as comfy_nodes

TOKENS = "<t1>+<t2>"
INIT = "<rand-0.013>+man"
# a tiny, fast run: 64-pixel canvas, one image per step; learning rates x100 (the acceptance test of the spec)
FAST = {"resolution": 64, "batch_size": 1, "grad_accum": 1, "repeats": 10, "lr_emb": 1e-1, "lr_te": 1e-3,
        "lr_unet": 1e-2}
PROBE_PROMPT = "a photo of <t1> <t2>"


@pytest.fixture(scope="module")
def trainset(env):
    data = training_images(4, 64, seed=0)
    return env.pack("fusion.train.dataset").make_training_set([d[0] for d in data], [d[1] for d in data],
                                                              [d[2] for d in data])


def train(env, tiny, trainset, steps, progress=None, concepts=None, tokens=TOKENS, init=INIT, **settings):
    model, clip, vae = tiny
    with torch.inference_mode():   # as ComfyUI runs a node
        return env.pack("nodes.glue.training").train_edlora(
            model, clip, vae, trainset, tokens, init, "auto", {**FAST, "steps": steps, **settings}, concepts,
            progress)


def snapshot(model, clip):
    """Every weight (cloned) and the parameter objects themselves, of the UNet and the CLIP."""
    roots = (model.model, clip.cond_stage_model)
    return ([{k: v.clone() for k, v in r.state_dict().items()} for r in roots],
            [{k: id(p) for k, p in r.named_parameters()} for r in roots])


def assert_untouched(before, after):
    """``after`` (a snapshot taken right after training) has the same weights and parameter objects."""
    weights, ids = after
    for was, now in zip(before[0], weights, strict=True):
        assert was.keys() == now.keys()
        changed = [k for k in was if not torch.equal(was[k], now[k])]
        assert not changed, changed[:5]
    assert ids == before[1]   # the very same parameter objects (the autograd aliases were swapped back)


def assert_nothing_left(model, clip):
    for root in (model.model, clip.cond_stage_model):
        for m in root.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__


def probe_loss(model, clip, concepts, vae):
    """The masked denoising loss of a fixed example at a fixed timestep and noise, with ε̂ taken from one Euler step
    of ComfyUI's own sampler to σ = 0 (so the prediction comes through the layer-wise conditioning as in sampling)."""
    image, mask, _caption = training_images(4, 64, seed=0)[0]
    latent = vae.encode(image[None])
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma(torch.tensor(400.0))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    cond = pn.text_encode(clip, concepts, PROBE_PROMPT)
    seen = {}
    comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                               torch.stack([sigma, torch.tensor(0.0)]), cond, cond, latent,
                               callback=lambda step, x0, x, total: seen.setdefault("x0", x0), disable_pbar=True)
    x0 = model.model.process_latent_in(latent)
    eps = (x0 + sigma * noise - seen["x0"].cpu()) / sigma
    small = torch.nn.functional.interpolate(mask[None, None], size=latent.shape[-2:], mode="bilinear")[0]
    return float(env_pack().masked_denoising_loss(eps, noise, small))


def env_pack():
    import comfy_env

    return comfy_env.env().pack("fusion.train.objectives")


@pytest.fixture(scope="module")
def trained(env, tiny, trainset):
    """40 steps (the rows never stop: threshold 1e9); the probe before (all rates 0: the initial concept) and
    after, and the weights before."""
    model, clip, vae = tiny
    before = snapshot(model, clip)
    initial = train(env, tiny, trainset, 1, lr_emb=0.0, lr_te=0.0, lr_unet=0.0, weight_decay=0.0)
    result = train(env, tiny, trainset, 40, emb_norm_threshold=1e9)
    after = snapshot(model, clip)   # before anything samples (sampling a LoRA'd clone patches the shared weights)
    return {"before": before, "after": after, "initial": initial, "result": result,
            "probe_before": probe_loss(initial.model, initial.clip, initial.concepts, vae),
            "probe_after": probe_loss(result.model, result.clip, result.concepts, vae)}


def test_loss_on_a_fixed_probe_falls(trained):
    before, after = trained["probe_before"], trained["probe_after"]
    curve = trained["result"].loss_map["loss"]
    print(f"\n[training] probe loss {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.0f} % lower); "
          f"training loss first 5 {sum(curve[:5]) / 5:.4f}, last 5 {sum(curve[-5:]) / 5:.4f}")
    assert after < 0.8 * before
    assert trained["result"].steps == 40 and len(curve) == 40 and all(math.isfinite(v) for v in curve)
    curves = trained["result"].loss_map
    assert len(curves["norm_l"]) == 40 and any(v > 0 for v in curves["attn_reg"])


def test_only_the_lora_and_the_rows_change(trained, tiny):
    model, clip, _ = tiny
    assert_untouched(trained["before"], trained["after"])
    assert_nothing_left(model, clip)
    result = trained["result"]
    assert not model.patches and not clip.patcher.patches       # the inputs got no patch
    edlora = result.edlora
    assert edlora.tokens == ["<t1>", "<t2>"] and edlora.embeddings["<t1>"].shape == (16, 1, 768)
    assert len(edlora.unet) == 128 and len(edlora.text["clip_l"]) == 2 * 4   # attention scopes, 2 CLIP layers
    untrained = [m for m, (up, _down) in list(edlora.unet.items()) + list(edlora.text["clip_l"].items())
                 if not up.abs().max() > 0]
    # at a 64-pixel canvas the middle block sees one pixel: its self-attention's softmax is 1 whatever q and k are
    assert untrained == ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                         "mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    initial = trained["initial"].edlora
    for token in edlora.tokens:
        assert not torch.equal(edlora.embeddings[token], initial.embeddings[token])
    norms = result.loss_map["norm_l"]
    assert len(set(norms[1:])) > 30     # with an unreachable threshold the rows keep changing
    # the output MODEL/CLIP are the input's clones plus one ordinary LoRA patch per trained module
    assert len(result.model.patches) == 128 and len(result.clip.patcher.patches) == 8
    assert result.concepts.concepts[-1].edlora is edlora and result.concepts.tables["<t1>"].shape == (16, 1, 768)


def test_threshold_zero_freezes_the_rows_and_the_same_seed_gives_the_same_curve(env, tiny, trainset, trained):
    x = train(env, tiny, trainset, 2, emb_norm_threshold=0.0)
    y = train(env, tiny, trainset, 2, emb_norm_threshold=0.0)
    z = train(env, tiny, trainset, 1, emb_norm_threshold=0.0)
    w = train(env, tiny, trainset, 1, emb_norm_threshold=0.0, seed=1)
    assert x.loss_map == y.loss_map
    for token in ("<t1>", "<t2>"):     # frozen after step 1, bit for bit
        assert torch.equal(x.edlora.embeddings[token], z.edlora.embeddings[token])
    assert x.loss_map["norm_l"][0] == x.loss_map["norm_l"][1]
    assert x.loss_map["loss"][0] == trained["result"].loss_map["loss"][0]   # the threshold acts after step 1 only
    assert w.loss_map["loss"][0] != x.loss_map["loss"][0]
    key = next(iter(x.edlora.unet))
    assert not torch.equal(x.edlora.unet[key][0], z.edlora.unet[key][0])   # the LoRA still trains


def test_gradient_checkpointing_trains_the_same(env, tiny, trainset):
    plain = train(env, tiny, trainset, 2)
    checkpointed = train(env, tiny, trainset, 2, gradient_checkpointing=True)
    for a, b in zip(plain.loss_map["loss"], checkpointed.loss_map["loss"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5)
    for module, (up, down) in plain.edlora.unet.items():
        torch.testing.assert_close(checkpointed.edlora.unet[module][0], up, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(checkpointed.edlora.unet[module][1], down, atol=1e-6, rtol=1e-4)
    model, clip, _ = tiny
    for root in (model.model, clip.cond_stage_model):
        assert not any("forward" in m.__dict__ for m in root.modules())


def test_save_then_load_gives_the_same_conditioning_and_noise(env, tiny, trained):
    model, clip, vae = tiny
    result = trained["result"]
    name = node("MixOfShowSaveEDLoRA", concepts=result.concepts, filename="trained_roundtrip", overwrite=True)[0]
    path = env.folder_paths.get_full_path("edloras", name)
    with open(path, "rb") as f:
        assert f.read(8) != b"PK\x03\x04"      # safetensors, not a torch.save zip/pickle
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    assert meta["format"] == "mixofshow-edlora" and meta["trained"] == "1" and meta["steps"] == "40"
    assert settings["preset"] == "MoS SD1.5 real" and settings["encoders"][0]["lr_emb"] == 0.1
    loaded_model, loaded_clip, loaded = pn.load_edlora(model, clip, name, 1.0, 1.0)
    ours = pn.text_encode(result.clip, result.concepts, PROBE_PROMPT)
    theirs = pn.text_encode(loaded_clip, loaded, PROBE_PROMPT)
    layerwise = env.pack("nodes.glue.layerwise").layerwise_of
    assert torch.equal(layerwise(ours[0]), layerwise(theirs[0]))
    assert probe_loss(loaded_model, loaded_clip, loaded, vae) == probe_loss(result.model, result.clip,
                                                                             result.concepts, vae)


def test_an_interrupt_stops_within_a_step_and_leaves_the_next_prompt_unchanged(env, tiny, trainset):
    model, clip, _ = tiny
    mm.unload_all_models()   # the shared weights unpatched (earlier tests sampled LoRA'd clones)
    before = snapshot(model, clip)

    def image():
        cond = comfy_nodes.CLIPTextEncode().encode(clip, "a red disc")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return comfy_nodes.common_ksampler(model, 3, 2, 5.0, "euler", "normal", cond, cond, latent)[0]["samples"]

    reference = image()
    steps = []

    def progress(done, total, text):
        steps.append(done)
        if done == 2:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(env, tiny, trainset, 10, progress=progress)
    finally:
        mm.interrupt_current_processing(False)
    assert steps == [1, 2]
    assert_untouched(before, snapshot(model, clip))
    assert_nothing_left(model, clip)
    assert torch.equal(image(), reference)


def _refusal(env, tiny, trainset, **kw):
    calls = []
    with pytest.raises(ValueError) as caught:
        train(env, tiny, trainset, 3, progress=lambda *a: calls.append(a), **kw)
    assert not calls   # refused before the first step
    return str(caught.value)


def test_bad_inputs_are_refused_before_the_first_step(env, tiny, trainset, write_edlora):
    model, clip, vae = tiny
    ds = env.pack("fusion.train.dataset")
    name = write_edlora("tr_taken.safetensors", tokens=("<t1>",), seed=3)
    _m, _c, taken = pn.load_edlora(model, clip, name)
    assert "concept token <t1> is already defined by 'tr_taken.safetensors'" in \
        _refusal(env, tiny, trainset, concepts=taken)
    word = "xylophonists"
    assert len(clip.tokenize(word)["l"][0]) > 0
    assert f"init token '{word}' is" in _refusal(env, tiny, trainset, init=f"<rand>+{word}")
    no_masks = ds.make_training_set([e.image.permute(1, 2, 0) for e in trainset.examples])
    assert "has no masks" in _refusal(env, tiny, no_masks, use_mask_loss=True)
    flow = comfy_nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(model, 3.0)[0]
    with pytest.raises(ValueError, match="trains ε- or v-prediction models"):
        with torch.inference_mode():
            env.pack("nodes.glue.training").train_edlora(flow, clip, vae, trainset, TOKENS, INIT, "auto", FAST)
    mini = env.tiny.build_model("mini", 0)
    with pytest.raises(ValueError, match="of no family this pack knows"):
        with torch.inference_mode():
            env.pack("nodes.glue.training").train_edlora(mini, clip, vae, trainset, TOKENS, INIT, "auto", FAST)
    assert "is for SDXL models" in str(pytest.raises(ValueError, env.pack("nodes.glue.training").train_edlora,
                                                     model, clip, vae, trainset, TOKENS, INIT, "CC SDXL",
                                                     FAST).value)


def test_training_graph_through_the_executor(env, tmp_path):
    """Training set from a folder of the input directory (images, masks, captions) -> Train -> Plot Loss Graph,
    Save ED-LoRA, and a prompt with the new tokens sampled with the stock KSampler."""
    folder = env.base / "input" / "tr_character"
    for sub in ("image", "mask", "caption"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (image, mask, caption) in enumerate(training_images(3, 64, seed=4)):
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(folder / "image" / f"{i}.png")
        Image.fromarray((mask.numpy() * 255).astype("uint8")).save(folder / "mask" / f"{i}.png")
        (folder / "caption" / f"{i}.txt").write_text(caption + "\n")
    graph = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowEDLoRATrainingSet", "inputs": {
            "folder": "tr_character", "templates": "human", "keep_first": 1, "crop_p": 0.5}},
        "3": {"class_type": "MixOfShowTrainEDLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "training_set": ["2", 0],
            "concept_tokens": "<g1>+<g2>", "init_tokens": "<rand-0.013>+man", "preset": "auto", "steps": 2,
            "seed": 0, "resolution": 64, "batch_size": 1, "grad_accum": 1}},
        "4": {"class_type": "LossGraphNode", "inputs": {"loss": ["3", 3], "filename_prefix": "tr_loss"}},
        "5": {"class_type": "MixOfShowSaveEDLoRA", "inputs": {"concepts": ["3", 2], "filename": "tr_graph"}},
        "6": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2],
                                                              "text": "a <g1> <g2> on a beach"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": 1,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "tr_graph"}},
    }
    executor, _server = run_prompt(graph, "training-graph")
    assert executor.success, execution_error(executor)
    outputs = executor.history_result["outputs"]
    assert "3 images (64x64, 64x96, 96x64), with masks" in outputs["2"]["text"][0]
    assert outputs["3"]["text"][0].startswith("<g1> <g2>: 2 steps, loss")
    assert outputs["4"]["images"] and outputs["10"]["images"]
    assert outputs["5"]["text"][0].startswith("tr_graph") and env.folder_paths.get_full_path(
        "edloras", outputs["5"]["text"][0].split(":")[0])


# SDXL (issue 21 on the tiny SDXL-layout model: 70 cross-attention layers, CLIP-L 768 and bigG 1280 at full
# width, ComfyUI's own SDXL classes): both encoders get their own 70-row tables and text LoRAs, the probe loss
# falls, the base is untouched, Save -> Load ED-LoRA is the same, and the saved file is refused on SD1.5.


@pytest.fixture(scope="module")
def trained_xl(env, tiny_xl, trainset):
    model, clip, vae = tiny_xl
    before = snapshot(model, clip)
    initial = train(env, tiny_xl, trainset, 1, lr_emb=0.0, lr_te=0.0, lr_unet=0.0, weight_decay=0.0,
                    lr_emb_g=0.0, lr_te_g=0.0)
    result = train(env, tiny_xl, trainset, 20, emb_norm_threshold=1e9, emb_norm_threshold_g=1e9)
    after = snapshot(model, clip)
    return {"before": before, "after": after, "initial": initial, "result": result,
            "probe_before": probe_loss(initial.model, initial.clip, initial.concepts, vae),
            "probe_after": probe_loss(result.model, result.clip, result.concepts, vae)}


def test_sdxl_probe_loss_falls_and_only_the_lora_and_rows_change(trained_xl, tiny_xl):
    before, after = trained_xl["probe_before"], trained_xl["probe_after"]
    print(f"\n[training, tiny SDXL] probe loss {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.0f} % lower)")
    assert after < 0.8 * before
    result = trained_xl["result"]
    assert result.steps == 20 and all(math.isfinite(v) for v in result.loss_map["loss"])
    model, clip, _ = tiny_xl
    assert_untouched(trained_xl["before"], trained_xl["after"])
    assert_nothing_left(model, clip)
    edlora, initial = result.edlora, trained_xl["initial"].edlora
    assert edlora.family.name == "sdxl"
    for encoder, width in (("clip_l", 768), ("clip_g", 1280)):
        assert set(edlora.tables[encoder]) == {"<t1>", "<t2>"} and edlora.text[encoder]
        for token, table in edlora.tables[encoder].items():
            assert table.shape == (70, 1, width)
            assert not torch.equal(table, initial.tables[encoder][token])   # both encoders' rows were trained
    assert len(set(result.loss_map["norm_l"][1:])) > 10 and len(set(result.loss_map["norm_g"][1:])) > 10


def test_sdxl_save_then_load_is_the_same_and_refused_on_sd15(env, tiny_xl, tiny, trained_xl):
    model, clip, vae = tiny_xl
    result = trained_xl["result"]
    name = node("MixOfShowSaveEDLoRA", concepts=result.concepts, filename="trained_xl_roundtrip", overwrite=True)[0]
    loaded_model, loaded_clip, loaded = pn.load_edlora(model, clip, name, 1.0, 1.0)
    ours = pn.text_encode(result.clip, result.concepts, PROBE_PROMPT)
    theirs = pn.text_encode(loaded_clip, loaded, PROBE_PROMPT)
    layerwise = env.pack("nodes.glue.layerwise").layerwise_of
    assert torch.equal(layerwise(ours[0]), layerwise(theirs[0]))
    assert torch.equal(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"])
    assert probe_loss(loaded_model, loaded_clip, loaded, vae) == probe_loss(result.model, result.clip,
                                                                             result.concepts, vae)
    sd_model, sd_clip, _ = tiny
    with pytest.raises(ValueError) as refused:
        pn.load_edlora(sd_model, sd_clip, name, 1.0, 1.0)
    assert name in str(refused.value) and "SDXL" in str(refused.value) and "SD1" in str(refused.value)
