"""Gradient fusion through the HTTP API of a real ComfyUI server: a 0.1.0 prompt still validates and runs,
the saved bundle samples the same through the stock Load LoRA and through Load ED-LoRA as the fused
model itself, the new inputs are checked, the seed input asks for no randomisation."""
import shutil
import time

from comfy_server import error_message
from fusion_graphs import fusion_and_save
from safetensors.torch import load_file


def fusion_graph(**new_inputs):
    """The shared fusion prompt (0.1.0's inputs plus ``new_inputs``), then plain sampling with the fused model."""
    return {**fusion_and_save(("srv_0.pth", "srv_1.pth"), steps=2, size=64, prefix="http_fused", **new_inputs),
            **sample("4", "4", "http_fused_model")}

def sample(model, clip, prefix):
    """Plain-prompt sampling into a .latent file (tensors to compare across prompts)."""
    return {
        f"{prefix}_pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": [clip, 1], "text": "a castle on a hill"}},
        f"{prefix}_neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": [clip, 1], "text": "blurry"}},
        f"{prefix}_lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "positive": [f"{prefix}_pos", 0], "negative": [f"{prefix}_neg", 0],
            "latent_image": [f"{prefix}_lat", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0],
                                                                  "filename_prefix": f"latents/{prefix}"}},
    }


def latent(server, prefix):
    (path,) = sorted((server.base / "output" / "latents").glob(f"{prefix}_*.latent"))[-1:]
    return load_file(str(path))["latent_tensor"]


def test_the_seed_asks_for_no_randomisation_and_new_inputs_are_optional(server):
    info = server.get("/object_info/MixOfShowGradientFusion")["MixOfShowGradientFusion"]
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    assert list(required) == ["model", "clip", "concepts", "steps", "width", "height", "seed", "solver", "cache"]
    assert list(optional) == ["sampler_name", "scheduler", "ridge"]
    assert required["seed"][1]["default"] == 0 and not required["seed"][1].get("control_after_generate")
    assert optional["sampler_name"][1]["default"] == "reference" and "euler" in optional["sampler_name"][1]["options"]
    assert optional["ridge"][1]["default"] > 0 and all(v[1].get("tooltip") for v in {**required, **optional}.values())


def test_a_0_1_0_prompt_fuses_and_its_bundle_loads_everywhere(server):
    entry = server.run(fusion_graph())
    assert entry["status"]["status_str"] == "success", error_message(entry)
    name = entry["outputs"]["5"]["text"][0].split(":")[0]
    assert name.startswith("http_fused_") and (server.base / "models" / "edloras" / name).is_file()
    (server.base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    shutil.copy(server.base / "models" / "edloras" / name, server.base / "models" / "loras" / name)
    deadline = time.time() + 30  # the loras folder listing is refreshed on its own
    while name not in str(server.get("/object_info/LoraLoader")) and time.time() < deadline:
        time.sleep(0.5)
    stock = {"1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
             **sample("2", "2", "http_stock")}
    entry = server.run(stock)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    loaded = {"1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
              "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                    "edlora_name": name, "text_encoder_strength": 0.5,
                                                                    "unet_strength": 0.5}},
              "3": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["2", 1], "concepts": ["2", 2],
                                                                    "text": "a <s1> <s2> and a <t1>"}},
              **sample("2", "2", "http_loaded")}
    entry = server.run(loaded)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert "<s1> <s2> <t1>" in entry["outputs"]["2"]["text"][0]
    fused, via_stock, via_loader = (latent(server, p) for p in ("http_fused_model", "http_stock", "http_loaded"))
    scale = float(fused.abs().max())
    assert float((via_stock - fused).abs().max()) <= 1e-5 * scale
    assert float((via_loader - fused).abs().max()) <= 1e-5 * scale


def test_new_inputs_run_and_bad_values_are_refused(server):
    entry = server.run(fusion_graph(sampler_name="euler", scheduler="karras", ridge=0.001))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    status, body = server.post_json("/prompt", {"prompt": fusion_graph(scheduler="no_such_scheduler")})
    assert status == 400 and "scheduler" in str(body.get("node_errors", {}).get("4", {}))
    status, body = server.post_json("/prompt", {"prompt": fusion_graph(ridge=-1.0)})
    assert status == 400 and "ridge" in str(body.get("node_errors", {}).get("4", {}))
