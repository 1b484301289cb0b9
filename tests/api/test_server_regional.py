"""Issue 3 through the HTTP API: three ED-LoRAs, three regions from a reference pose image, a
random OpenPose-layout ControlNet loaded by the stock loader, the regional sampler -> image."""
import shutil
from pathlib import Path

from comfy_server import error_message
from safetensors.torch import save_file

POSES = Path(__file__).resolve().parents[2] / "assets" / "poses"  # in the repo (Apache-2.0, see NOTICE)


def test_multi_concept_regional_graph_with_controlnet(server):
    import comfy_env  # in-process ComfyUI, only to build the fixture pack's random ControlNet

    tiny = comfy_env.env().tiny
    save_file(tiny.controlnet_state_dict("wide", 5),
              str(server.base / "models" / "controlnet" / "tiny_openpose.safetensors"))
    shutil.copy(POSES / "harry_hermione_thanos.png", server.base / "input" / "pose.png")
    g = {"1": {"class_type": "TinySD15Loader", "inputs": {"unet": "wide", "seed": 0}}}
    model, clip, concepts = ["1", 0], ["1", 1], None
    for i, name in enumerate(("potter", "hermione", "thanos")):
        node = str(10 + i)
        g[node] = {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
            "model": model, "clip": clip, "edlora_name": f"wide_{name}.pth",
            "text_encoder_strength": 0.7, "unet_strength": 0.7, **({"concepts": concepts} if concepts else {})}}
        model, clip, concepts = [node, 0], [node, 1], [node, 2]
    g.update({
        "20": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}},
        "21": {"class_type": "MixOfShowPoseRegions", "inputs": {
            "image": ["20", 0], "clip": clip, "concepts": concepts, "margin": 0.05, "negative": "blurry",
            "prompts": "a <potter1> <potter2>, in a robe\na <hermione1> <hermione2>\na <thanos1> <thanos2>"}},
        "22": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": clip, "concepts": concepts,
               "text": "three people standing in a castle hall"}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "lowres, bad anatomy"}},
        "24": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny_openpose.safetensors"}},
        "25": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["22", 0], "negative": ["23", 0], "control_net": ["24", 0], "image": ["20", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "26": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 512, "batch_size": 1}},
        "27": {"class_type": "MixOfShowRegionalSampler", "inputs": {
            "model": model, "positive": ["25", 0], "negative": ["25", 1], "latent_image": ["26", 0],
            "regions": ["21", 0], "seed": 7, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "28": {"class_type": "VAEDecode", "inputs": {"samples": ["27", 0], "vae": ["1", 2]}},
        "29": {"class_type": "SaveImage", "inputs": {"images": ["28", 0], "filename_prefix": "regional"}},
    })
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    image = entry["outputs"]["29"]["images"][0]
    from PIL import Image
    with Image.open(server.base / "output" / image["filename"]) as im:
        assert im.size == (1024, 512)
