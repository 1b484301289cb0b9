"""Issue 11: the Regions Editor's backend (the same regions as the box nodes, errors naming the box),
Load Reference Pose, the region previews of Regions from Pose / the regional sampler, and the
functions behind the web UI's routes (pose boxes, a file's tokens)."""
import json
import os

import folder_paths
import numpy as np
import pack_nodes as pn
import pytest
import torch
from comfy_env import execution_error, node, node_ui, run_prompt
from PIL import Image

from fusion.regions.pose import find_pose_boxes

POSE = "harry_hermione_thanos.png"
TINY = {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}}


@pytest.fixture(scope="module")
def concept(tiny, write_edlora):
    """(MODEL, CLIP, concepts) after loading one tiny ED-LoRA with tokens <ea1> <ea2>."""
    model, clip, _ = tiny
    return pn.load_edlora(model, clip, write_edlora("ed_editor.pth", tokens=("<ea1>", "<ea2>"), seed=31))


def boxes_json(*boxes):
    return json.dumps([dict(zip(("top", "left", "bottom", "right"), b[:4], strict=True), **b[4]) for b in boxes])


def editor(clip, regions_json, width=64, height=48, image=None, concepts=None, regions=None):
    return node("MixOfShowRegionsEditor", clip=clip, width=width, height=height, regions_json=regions_json,
                image=image, concepts=concepts, regions=regions)


def same_conditioning(a, b):
    assert torch.equal(a[0][0], b[0][0])
    la, lb = (c[0][1].get("model_conds", {}).get("mixofshow_layerwise") for c in (a, b))
    assert (la is None) == (lb is None)
    if la is not None:
        assert torch.equal(la.cond, lb.cond)


def test_editor_regions_equal_the_box_nodes_regions(env, concept):
    _, clip, concepts = concept
    text = boxes_json((4, 2, 40, 30, {"prompt": "a <ea1> <ea2> reading", "negative": "blurry",
                                       "control_strength": 0.5, "label": "reader", "color": "#00ff00"}),
                      (0, 28, 48, 64, {"prompt": "a tree", "negative": "blurry"}))
    regions, masks, preview = editor(clip, text, concepts=concepts)
    neg = pn.text_encode(clip, concepts, "blurry")
    expected = pn.region(pn.text_encode(clip, concepts, "a <ea1> <ea2> reading"), neg,
                         pn.box_mask(64, 48, 4, 2, 40, 30), control_strength=0.5)
    expected = pn.region(pn.text_encode(clip, concepts, "a tree"), neg, pn.box_mask(64, 48, 0, 28, 48, 64),
                         regions=expected)
    assert len(regions) == 2 and masks.shape == (2, 48, 64)
    for got, want, label in zip(regions, expected, ("reader", "a tree"), strict=True):
        assert torch.equal(got.mask, want.mask) and got.box == want.box and got.box is not None
        assert got.control_strength == want.control_strength and got.label == label
        same_conditioning(got.positive, want.positive)
        same_conditioning(got.negative, want.negative)
    assert torch.equal(masks, torch.stack([r.mask for r in expected]))
    assert preview.shape == (1, 48, 64, 3)
    assert torch.allclose(preview[0, 34, 16], torch.tensor([64 * 0.65, 255 * 0.35 + 64 * 0.65, 64 * 0.65]) / 255,
                          atol=1 / 255)  # box 1 tinted with its own colour on the grey canvas


def test_image_size_wins_and_regions_chain(env, concept):
    _, clip, concepts = concept
    image = torch.zeros(1, 32, 96, 3)
    earlier = pn.region(pn.text_encode(clip, concepts, "sky"), pn.text_encode(clip, concepts, ""),
                        pn.box_mask(96, 32, 0, 0, 8, 96))
    regions, masks, preview = editor(clip, boxes_json((0, 50, 200, 200, {"prompt": "a <ea1>"})), width=512,
                                     height=512, image=image, concepts=concepts, regions=earlier)
    assert len(regions) == 2 and regions[0] is earlier[0]
    assert masks.shape == (1, 32, 96) and regions[1].box == (0, 50, 32, 96)  # clamped to the image
    assert preview.shape == (1, 32, 96, 3)


def test_the_prompt_runs_and_the_ui_shows_the_preview_and_background(env, write_edlora):
    name = write_edlora("ed_editor_run.pth", tokens=("<er1>",), seed=32)
    text = boxes_json((0, 0, 48, 32, {"prompt": "a <er1>"}), (0, 32, 48, 64, {"prompt": "a lake"}))
    g = {
        "1": TINY,
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "edlora_name": name,
              "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
        "4": {"class_type": "MixOfShowRegionsEditor", "inputs": {"clip": ["2", 1], "concepts": ["2", 2],
              "image": ["3", 0], "width": 512, "height": 512, "regions_json": text}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "two things"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "7": {"class_type": "MixOfShowRegionalSampler", "inputs": {
            "model": ["2", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "regions": ["4", 0], "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/editor"}},
        "9": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 1]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "editor_masks"}},
    }
    ex, _ = run_prompt(g, "editor-run")
    assert ex.success, execution_error(ex) or ex.validation
    outputs = ex.history_result["outputs"]
    shown = outputs["4"]
    canvas = shown["mixofshow_canvas"][0]
    assert (canvas["width"], canvas["height"]) == (64, 48) and canvas["background"]["type"] == "temp"
    preview = Image.open(os.path.join(folder_paths.get_temp_directory(), shown["images"][0]["subfolder"],
                                      shown["images"][0]["filename"]))
    assert preview.size == (64, 48)
    sampler_preview = outputs["7"]["images"][0]
    assert sampler_preview["type"] == "temp" and sampler_preview["filename"].startswith("mixofshow_regions")
    saved = outputs["10"]["images"]
    masks = [np.array(Image.open(os.path.join(folder_paths.get_output_directory(), s["subfolder"], s["filename"])))
             for s in saved]
    assert (masks[0][:, :32] == 255).all() and (masks[0][:, 32:] == 0).all()
    assert (masks[1][:, 32:] == 255).all() and (masks[1][:, :32] == 0).all()


def test_regional_guider_shows_its_regions_and_no_regions_show_nothing(env, concept):
    model, clip, concepts = concept
    regions = editor(clip, boxes_json((0, 0, 48, 32, {"prompt": "a <ea1>"})), concepts=concepts)[0]
    cond = pn.text_encode(clip, concepts, "a lake")
    shown = node_ui("MixOfShowRegionalGuider", model=model, positive=cond, negative=cond, regions=regions, cfg=5.0)
    assert shown["images"][0]["filename"].startswith("mixofshow_regions")
    assert node_ui("MixOfShowRegionalGuider", model=model, positive=cond, negative=cond, regions=(), cfg=5.0) is None


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ("{}", "must be a JSON list"),
    ("[]", "no boxes"),
    ('[{"top": 0, "left": 0, "bottom": 10, "right": 10}]', "box 1: the prompt is empty"),
    ('[{"top": 0, "left": 0, "bottom": 10, "right": 10, "prompt": "a"}, 5]', "box 2: expected an object"),
    ('[{"top": "x", "left": 0, "bottom": 10, "right": 10, "prompt": "a"}]', "box 1: 'top' must be a finite number"),
    ('[{"left": 0, "bottom": 10, "right": 10, "prompt": "a"}]', "box 1: 'top' is missing"),
    ('[{"top": true, "left": 0, "bottom": 10, "right": 10, "prompt": "a"}]', "'top' must be a finite number"),
    ('[{"top": 0, "left": 0, "bottom": 10, "right": 10, "prompt": "a", "control_strength": 11}]',
     "box 1: control_strength must be between 0 and 10"),
    ('[{"top": 0, "left": 0, "bottom": 10, "right": 10, "prompt": "a", "color": "red"}]', "box 1: a colour must be"),
    ('[{"top": 0, "left": 0, "bottom": 10, "right": 10, "prompt": 3}]', "box 1: 'prompt' must be text"),
])
def test_bad_boxes_are_refused_before_the_run_naming_the_box(env, text, message):
    g = {"1": TINY, "2": {"class_type": "MixOfShowRegionsEditor", "inputs": {
        "clip": ["1", 1], "width": 64, "height": 48, "regions_json": text}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    ex, _ = run_prompt(g, "editor-bad")
    assert not ex.success
    errors = json.dumps(ex.validation[3])
    assert message in errors, errors


def test_boxes_empty_in_the_image_and_unknown_tokens_name_the_box(env, concept):
    _, clip, concepts = concept
    text = boxes_json((0, 0, 10, 10, {"prompt": "a"}), (60, 0, 80, 10, {"prompt": "b"}))
    with pytest.raises(ValueError, match=r"box 2: .*\[60, 0, 80, 10\] is empty inside the 64×48 image"):
        editor(clip, text, concepts=concepts)
    with pytest.raises(ValueError, match=r"^Regions Editor box 1, prompt: prompt uses <nobody>"):
        editor(clip, boxes_json((0, 0, 10, 10, {"prompt": "a <nobody>"})), concepts=concepts)


def test_inputs_are_not_modified(env, concept):
    _, clip, concepts = concept
    image = torch.rand(1, 48, 64, 3)
    before = image.clone()
    editor(clip, boxes_json((0, 0, 20, 20, {"prompt": "a <ea1>"})), image=image, concepts=concepts)
    assert torch.equal(image, before)


def test_load_reference_pose_lists_the_shipped_poses_and_loads_one(env):
    ed = env.pack("nodes.glue.images")
    assert POSE in ed.reference_poses()
    image, width, height = node("MixOfShowLoadReferencePose", pose=POSE)
    assert image.shape == (1, 512, 1024, 3) and (width, height) == (1024, 512)
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    g = {"1": {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": "missing.png"}},
         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    ex, _ = run_prompt(g, "pose-bad")
    assert not ex.success and "missing.png" in json.dumps(ex.validation[3])


def test_pose_boxes_route_uses_the_pose_regions_detector(env):
    ed = env.pack("nodes.glue.images")
    image, _, _ = node("MixOfShowLoadReferencePose", pose=POSE)
    result = ed.pose_boxes_for({"pose": POSE}, 0.05)
    assert (result["width"], result["height"]) == (1024, 512)
    assert result["boxes"] == [list(b) for b in find_pose_boxes(image[0], margin=0.05)]
    assert len(result["boxes"]) == 3
    Image.open(ed.POSES_DIR / POSE).save(os.path.join(folder_paths.get_input_directory(), "pose_copy.png"))
    assert ed.pose_boxes_for({"filename": "pose_copy.png", "type": "input"})["boxes"] == result["boxes"]
    with pytest.raises(ValueError, match="outside the input folder"):
        ed.pose_boxes_for({"filename": "../../etc/passwd", "type": "input"})
    with pytest.raises(ValueError, match="not one of the shipped poses"):
        ed.pose_boxes_for({"pose": "../editor_nodes.py"})
    with pytest.raises(FileNotFoundError):
        ed.pose_boxes_for({"filename": "nope.png", "type": "input"})


def test_tokens_route_reads_the_file_before_any_run(env, write_edlora):
    routes = env.pack("nodes.glue.routes")
    name = write_edlora("ed_tokens.safetensors", tokens=("<tk1>", "<tk2>"), seed=33)
    assert routes.tokens_of(name) == ["<tk1>", "<tk2>"]
    with pytest.raises(FileNotFoundError):
        routes.tokens_of("nope.pth")


def test_tokens_route_reads_a_bundle_with_an_upper_case_extension(env):
    """Load ED-LoRA takes ``.SAFETENSORS`` bundles; the tokens it shows before a run come from the same rule."""
    import torch

    from fusion.files.bundle import FusedBundle, save_bundle

    routes = env.pack("nodes.glue.routes")
    concepts = [{"name": "a.pth", "digest": "d", "tokens": ["<ub1>", "<ub2>"], "trigger_words": ""}]
    bundle = FusedBundle(lora={"lora_unet_x": (torch.zeros(4, 2), torch.zeros(2, 4))}, concepts=concepts,
                         tables={"clip_l": {"<ub1>": torch.zeros(16, 1, 768), "<ub2>": torch.zeros(16, 1, 768)}})
    save_bundle(bundle, str(env.base / "models" / "edloras" / "upper_bundle.SAFETENSORS"))
    assert routes.tokens_of("upper_bundle.SAFETENSORS") == ["<ub1>", "<ub2>"]


def test_pose_regions_outputs_and_shows_its_preview(env, concept):
    _, clip, concepts = concept
    image, _, _ = node("MixOfShowLoadReferencePose", pose=POSE)
    prompts = "a <ea1>\na <ea2>\na tree"
    regions, masks, preview = pn.pose_regions(image, clip, prompts, "", 0.05, concepts)
    ui = node_ui("MixOfShowPoseRegions", image=image, clip=clip, prompts=prompts, negative="", margin=0.05,
                 concepts=concepts, regions=None, control_strength=1.0)
    assert preview.shape == (1, 512, 1024, 3) and masks.shape == (3, 512, 1024)
    assert [r.label for r in regions] == ["<ea1>", "<ea2>", "a tree"]
    assert ui["images"][0]["type"] == "temp"
    # away from the boxes (hermione's ends at 482, thanos' starts at 635) it is the pose itself
    assert torch.equal(preview[0, :, 500:620], image[0, :, 500:620])
    assert not torch.equal(preview[0, :, 20:270], image[0, :, 20:270])
