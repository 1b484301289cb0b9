"""Issue 2: API-format prompts through ComfyUI's own validator and executor (stock nodes downstream,
bad input, inputs never mutated)."""
import os

import pytest
import torch
from comfy_env import execution_error, run_prompt
from safetensors.torch import save_file

TINY = {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}}


def ksampler(model, pos, neg, latent, seed=5, steps=2):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": pos, "negative": neg, "latent_image": latent, "seed": seed, "steps": steps,
        "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def base_graph(edlora_a, edlora_b, prompt):
    return {
        "1": TINY,
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "edlora_name": edlora_a,
            "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "3": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
            "model": ["2", 0], "clip": ["2", 1], "concepts": ["2", 2], "edlora_name": edlora_b,
            "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "4": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2], "text": prompt}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "blurry, lowres"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
        "7": ksampler(["3", 0], ["4", 0], ["5", 0], ["6", 0]),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "mos_test"}},
    }


def test_two_edloras_with_stock_nodes_downstream(env, write_edlora):
    a = write_edlora("g_a.pth", tokens=("<ga1>", "<ga2>"), seed=21)
    b = write_edlora("g_b.safetensors", tokens=("<gb1>",), seed=22, spelling="research")
    g = base_graph(a, b, "a <ga1> <ga2> and a <gb1>, (smiling:1.2)")
    g["10"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2],
                                                                "text": "a <gb1> in the rain"}}
    g["11"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["10", 0]}}
    g["12"] = {"class_type": "ConditioningAverage",
               "inputs": {"conditioning_to": ["4", 0], "conditioning_from": ["10", 0], "conditioning_to_strength": 0.6}}
    g["13"] = {"class_type": "ConditioningSetTimestepRange",
               "inputs": {"conditioning": ["11", 0], "start": 0.0, "end": 0.5}}
    g["14"] = {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["13", 0], "conditioning_2": ["12", 0]}}
    g["7"] = ksampler(["3", 0], ["14", 0], ["5", 0], ["6", 0])
    # SamplerCustomAdvanced with a stock guider
    g["20"] = {"class_type": "CFGGuider",
               "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 5.0}}
    g["21"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    g["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    g["23"] = {"class_type": "BasicScheduler",
               "inputs": {"model": ["3", 0], "scheduler": "karras", "steps": 2, "denoise": 1.0}}
    g["24"] = {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["21", 0], "guider": ["20", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
                          "latent_image": ["6", 0]}}
    g["25"] = {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "latents/mos"}}
    ex, _ = run_prompt(g, "stock-downstream")
    assert ex.success, execution_error(ex) or ex.validation
    images = ex.history_result["outputs"]["9"]["images"]
    assert len(images) == 2


def test_originals_are_never_mutated(env, tiny, write_edlora):
    """Sample with the untouched tiny model before and after the pack's nodes ran on it."""
    a = write_edlora("m_a.pth", tokens=("<ma1>",), seed=23)
    b = write_edlora("m_b.pth", tokens=("<mb1>",), seed=24)
    plain = {"1": TINY,
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a house"}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "5": ksampler(["1", 0], ["2", 0], ["3", 0], ["4", 0]),
             "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/plain"}}}
    model, clip, _ = env.nodes.NODE_CLASS_MAPPINGS["TinySD15Loader"]().load("narrow", 0)
    before_patches, before_clip = dict(model.patches), dict(clip.patcher.patches)
    before_options = repr(model.model_options)

    def latent_of(ex):
        import glob

        from safetensors.torch import load_file
        files = sorted(glob.glob(str(env.base / "output" / "latents" / "plain*.latent")), key=os.path.getmtime)
        return load_file(files[-1])["latent_tensor"]

    ex, _ = run_prompt(plain, "before")
    assert ex.success, execution_error(ex)
    first = latent_of(ex)
    ex, _ = run_prompt(base_graph(a, b, "a <ma1> with a <mb1>"), "pack")
    assert ex.success, execution_error(ex)
    ex, _ = run_prompt(plain, "after")
    assert ex.success, execution_error(ex)
    assert torch.equal(first, latent_of(ex))
    assert model.patches == before_patches and clip.patcher.patches == before_clip
    assert repr(model.model_options) == before_options


def _error_of(env, graph):
    ex, server = run_prompt(graph, "bad")
    assert not ex.success
    msg = execution_error(ex)
    assert msg, ex.status_messages
    executed = [d.get("node") for e, d in server.messages if e == "executing"]
    assert "1" in executed and "7" not in executed, "sampling started before the error"
    return msg


def test_pickle_that_runs_code_is_refused_and_never_runs(env, tmp_path, write_edlora):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"params": {"new_concept_embedding": {"<x1>": Evil()}}},
               env.base / "models" / "edloras" / "evil.pth")
    ok = write_edlora("ok_e.pth", tokens=("<ok1>",))
    msg = _error_of(env, base_graph(ok, "evil.pth", "a <ok1>"))
    assert "evil.pth" in msg and "weights_only" in msg and "nothing in it was run" in msg
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "not_edlora", "sd2_width", "collision", "unknown_token"])
def test_bad_input_gets_a_clear_error_before_sampling(env, write_edlora, case):
    good = write_edlora("good_b.pth", tokens=("<gd1>", "<gd2>"), seed=30)
    folder = env.base / "models" / "edloras"
    prompt = "a <gd1> <gd2>"
    if case == "truncated":
        write_edlora("trunc.pth", tokens=("<tr1>",))
        data = (folder / "trunc.pth").read_bytes()
        (folder / "trunc.pth").write_bytes(data[: len(data) // 2])
        other, expect = "trunc.pth", ["trunc.pth", "truncated or corrupt"]
    elif case == "not_edlora":
        save_file({"model.weight": torch.zeros(3)}, str(folder / "notedlora.safetensors"))
        other, expect = "notedlora.safetensors", ["notedlora.safetensors", "not an ED-LoRA"]
    elif case == "sd2_width":
        state = {"new_concept_embedding": {"<w1>": torch.zeros(16, 1024)}}
        torch.save(state, folder / "sd2.pth")
        other, expect = "sd2.pth", ["sd2.pth", "1024", "768"]
    elif case == "collision":
        other = write_edlora("dup.pth", tokens=("<gd2>",), seed=31)
        expect = ["<gd2>", "good_b.pth", "dup.pth"]
    else:
        other = write_edlora("other_u.pth", tokens=("<ou1>",), seed=32)
        prompt = "a <gd1> <gd2> next to <nobody>"
        expect = ["<nobody>", "no loaded ED-LoRA defines"]
    msg = _error_of(env, base_graph(good, other, prompt))
    for piece in expect:
        assert piece in msg, msg


def test_convert_node_then_load_the_converted_file(env, write_edlora):
    src = write_edlora("conv_src.pth", tokens=("<cv1>",), seed=33, spelling="research")
    ex, _ = run_prompt({"1": {"class_type": "MixOfShowConvertEDLoRA",
                              "inputs": {"edlora_name": src, "output_name": "conv_out"}}}, "convert")
    assert ex.success, execution_error(ex)
    assert (env.base / "models" / "edloras" / "conv_out.safetensors").is_file()
    other = write_edlora("conv_other.pth", tokens=("<cv2>",), seed=34)
    ex, _ = run_prompt(base_graph("conv_out.safetensors", other, "a <cv1> and <cv2>"), "load-converted")
    assert ex.success, execution_error(ex)


def test_convert_node_never_overwrites_unless_asked(env, write_edlora):
    """Converting twice to one name keeps the first file and writes name_00001; an empty name uses the
    source's stem; overwrite=True replaces the named file but never the source itself."""
    folder = env.base / "models" / "edloras"
    src = write_edlora("conv_twice.pth", tokens=("<ct1>",), seed=35)
    other = write_edlora("conv_other2.pth", tokens=("<ct2>",), seed=36)

    def convert(name, output_name, **extra):
        ex, _ = run_prompt({"1": {"class_type": "MixOfShowConvertEDLoRA",
                                  "inputs": {"edlora_name": name, "output_name": output_name, **extra}}}, "convert")
        return ex

    assert convert(src, "conv_same").success
    first = (folder / "conv_same.safetensors").read_bytes()
    ex = convert(other, "conv_same")
    assert ex.success and ex.history_result["outputs"]["1"]["text"][0].startswith("conv_same_00001.safetensors")
    assert (folder / "conv_same.safetensors").read_bytes() == first  # the first file is untouched
    assert convert(src, "").success and (folder / "conv_twice.safetensors").is_file()  # empty name: the stem
    assert convert(other, "conv_same", overwrite=True).success
    assert (folder / "conv_same.safetensors").read_bytes() != first
    converted = "conv_same.safetensors"
    ex = convert(converted, "conv_same", overwrite=True)
    assert not ex.success and "would overwrite the file being converted" in execution_error(ex)
