"""Issue 2 through the HTTP API of a real ComfyUI server (started and stopped here)."""
from comfy_server import error_message


def graph(edlora="srv_0.pth", prompt="a <s1> <s2> on a beach"):
    return {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "edlora_name": edlora, "text_encoder_strength": 0.7,
                                                              "unet_strength": 0.7}},
        "3": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["2", 1], "concepts": ["2", 2], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "api_mos"}},
    }


def test_nodes_are_registered(server):
    info = server.get("/object_info/MixOfShowLoadEDLoRA")["MixOfShowLoadEDLoRA"]
    assert info["display_name"] == "Load ED-LoRA (Mix-of-Show)" and info["category"] == "Mix-of-Show/loaders"
    kind, options = info["input"]["required"]["edlora_name"]
    assert kind == "COMBO" and {"srv_0.pth", "srv_1.pth"} <= set(options["options"])  # a V3 combo
    assert "ED-LoRA" in info["search_aliases"]
    every_family = {"MixOfShowTextEncode", "MixOfShowGradientFusion", "MixOfShowRegion", "MixOfShowRegionalSampler"}
    assert every_family <= set(server.get("/object_info"))  # no node family failed to import


def test_web_extension_is_served(server):
    assert "/extensions/mixofshow/mixofshow.js" in server.get("/extensions")
    assert "registerExtension" in server.get("/extensions/mixofshow/mixofshow.js")


def test_prompt_returns_an_image(server):
    entry = server.run(graph())
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert "<s1> <s2>" in entry["outputs"]["2"]["text"][0]  # shown on the loader node by js/mixofshow.js
    images = entry["outputs"]["8"]["images"]
    assert images and (server.base / "output" / images[0]["filename"]).is_file()


def test_bad_file_is_an_execution_error_naming_it(server):
    entry = server.run(graph(edlora="broken.pth"))
    assert entry["status"]["status_str"] == "error"
    assert "broken.pth" in error_message(entry) and "corrupt" in error_message(entry)


def test_unknown_token_is_reported(server):
    entry = server.run(graph(prompt="a <s1> <zz9>"))
    assert "<zz9>" in error_message(entry)


def test_bad_widget_is_refused_with_http_400(server):
    g = graph()
    g["2"]["inputs"]["edlora_name"] = "missing.pth"
    status, body = server.post_json("/prompt", {"prompt": g})
    assert status == 400 and "2" in body.get("node_errors", {})
