"""The Regions Editor with the mouse, per frontend × renderer: a drawn box changes the regions the
queued prompt sends and the mask the backend builds; boxes move, resize and delete; "From pose" uses
the Python detector; the region previews of the editor, Regions from Pose and the Regional KSampler
appear in the nodes after a run."""
import json

import numpy as np
import pytest
from comfy_server import error_message as execution_error
from PIL import Image
from ui_support import TINY_TOKENS, queue_and_wait, tiny_graph

from fusion.regions.pose import find_pose_boxes

POSE = "harry_hermione_thanos.png"
RED = (0xE6, 0x19, 0x4B)  # the first region's colour (fusion/preview.py PALETTE)
W, H = 128, 64


def editor_graph() -> dict:
    return tiny_graph(**{
        "6": {"class_type": "MixOfShowRegionsEditor", "inputs": {"clip": ["2", 1], "concepts": ["2", 2], "width": W,
              "height": H, "regions_json": "[]"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a park"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "8": {"class_type": "MixOfShowRegionalSampler", "inputs": {
            "model": ["2", 0], "positive": ["5", 0], "negative": ["4", 0], "latent_image": ["7", 0],
            "regions": ["6", 0], "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/ui_editor"}},
        "10": {"class_type": "MaskToImage", "inputs": {"mask": ["6", 1]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "ui_editor_mask"}},
    })


def stage_box(ui, node_id: int):
    return ui.widget_element(node_id, "regions_json").query_selector(".mixofshow-stage").bounding_box()


def drag(ui, start, end) -> None:
    ui.page.mouse.move(*start)
    ui.page.mouse.down()
    ui.page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=4)
    ui.page.mouse.move(*end, steps=4)
    ui.page.mouse.up()
    ui.settle(200)


def at(rect, fx: float, fy: float) -> tuple[float, float]:
    return rect["x"] + rect["width"] * fx, rect["y"] + rect["height"] * fy


def editor_boxes(ui, node_id: int) -> list[dict]:
    return json.loads(ui.prompt()[str(node_id)]["inputs"]["regions_json"])


def colour_pixels(png: bytes, color, tol: int = 10) -> int:
    import io

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(color)).max(axis=-1) <= tol).sum())


def preview_shown(ui, node_id: int) -> bytes:
    """A screenshot of the region preview as the node shows it after a run (an <img> in Nodes 2.0,
    drawn on the canvas in the classic renderer)."""
    ui.page.wait_for_function("(id) => (app.nodeOutputs?.[id]?.images?.length ?? 0) > 0 || "
                              "(app.graph.getNodeById(id).imgs?.length ?? 0) > 0", arg=node_id, timeout=15000)
    ui.show_node(node_id, scale=1.0)
    if ui.vue:
        image = ui.node_element(node_id).locator("img[src*='mixofshow_regions']").first
        image.wait_for(state="visible", timeout=15000)
        ui.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        return image.screenshot()
    clip = ui.page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        const x = (node.pos[0] + ds.offset[0]) * ds.scale + r.left;
        const y = (node.pos[1] + ds.offset[1]) * ds.scale + r.top;
        return {x, y, width: node.size[0] * ds.scale, height: node.size[1] * ds.scale};
    }""", node_id)
    ui.page.wait_for_function("(id) => app.graph.getNodeById(id).imgs?.[0]?.complete", arg=node_id)
    ui.settle(500)
    return ui.page.screenshot(clip=clip)


def test_a_drawn_box_changes_the_queued_regions_and_the_mask(ui):
    ui.load_api(editor_graph())
    ui.show_node(6)
    assert editor_boxes(ui, 6) == []
    rect = stage_box(ui, 6)
    drag(ui, at(rect, 0.25, 0.25), at(rect, 0.75, 1.0))
    ui.page.keyboard.type("a <")  # the new box's prompt has the focus; "<" offers the connected tokens
    popup = ui.page.locator(".mixofshow-autocomplete")
    popup.wait_for(state="visible", timeout=10000)
    assert [i.split()[0] for i in popup.locator(".mixofshow-autocomplete-item").all_inner_texts()] == list(TINY_TOKENS)
    ui.page.keyboard.type("u1> <u2> on a bench")
    boxes = editor_boxes(ui, 6)
    assert len(boxes) == 1
    box = boxes[0]
    assert abs(box["left"] - W * 0.25) <= 1 and abs(box["top"] - H * 0.25) <= 1
    assert abs(box["right"] - W * 0.75) <= 1 and box["bottom"] == H
    assert box["prompt"] == "a <u1> <u2> on a bench" and box["negative"] == "" and box["color"] == "#e6194b"
    ui.shot("editor-drawn-box")
    entry = queue_and_wait(ui)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = entry["outputs"]["11"]["images"][0]
    mask = np.asarray(Image.open(ui.server.base / "output" / saved["subfolder"] / saved["filename"]).convert("L"))
    expected = np.zeros((H, W), np.uint8)
    expected[box["top"]:box["bottom"], box["left"]:box["right"]] = 255
    assert np.array_equal(mask, expected), "the backend's mask is exactly the drawn box"
    assert entry["outputs"]["6"]["mixofshow_canvas"][0]["width"] == W
    shown = preview_shown(ui, 6)
    assert colour_pixels(shown, RED) > 30, "the editor's region preview (red box 1) is drawn in the node"
    ui.shot("editor-preview-after-run")
    shown = preview_shown(ui, 8)
    assert colour_pixels(shown, RED) > 30, "the Regional KSampler shows the regions it sampled"
    ui.shot("sampler-preview-after-run")


def test_boxes_move_resize_and_delete_with_the_mouse(ui):
    g = editor_graph()
    g["6"]["inputs"]["regions_json"] = json.dumps([
        {"top": 8, "left": 8, "bottom": 40, "right": 40, "prompt": "a <u1>"},
        {"top": 20, "left": 80, "bottom": 60, "right": 120, "prompt": "a tree"}])
    ui.load_api(g)
    ui.show_node(6)
    rect = stage_box(ui, 6)
    assert len(ui.widget_element(6, "regions_json").query_selector_all(".mixofshow-box")) == 2
    # move box 1 by (+16, +8) pixels: grab it in its middle
    drag(ui, at(rect, 24 / W, 30 / H), at(rect, 40 / W, 38 / H))
    moved = editor_boxes(ui, 6)[0]
    assert (moved["top"], moved["left"], moved["bottom"] - moved["top"], moved["right"] - moved["left"]) == \
        pytest.approx((16, 24, 32, 32), abs=1)
    # resize box 2 by its bottom-right corner to (126, 62)
    corner = ui.widget_element(6, "regions_json").query_selector(
        '.mixofshow-box[data-index="1"] .mixofshow-handle.mixofshow-se')
    c = corner.bounding_box()
    drag(ui, (c["x"] + c["width"] / 2, c["y"] + c["height"] / 2), at(rect, 126 / W, 62 / H))
    resized = editor_boxes(ui, 6)[1]
    assert (resized["top"], resized["left"]) == (20, 80)
    assert (resized["bottom"], resized["right"]) == pytest.approx((62, 126), abs=1)
    ui.shot("editor-moved-resized")
    ui.widget_element(6, "regions_json").query_selector('.mixofshow-box[data-index="0"] .mixofshow-box-delete').click()
    left = editor_boxes(ui, 6)
    assert [b["prompt"] for b in left] == ["a tree"] and left[0]["color"] == "#3cb44b"  # keeps its colour


def test_boxes_round_trip_through_a_saved_workflow(ui):
    g = editor_graph()
    boxes = [{"top": 8, "left": 8, "bottom": 40, "right": 40, "prompt": "a <u1>", "negative": "blurry",
              "control_strength": 0.5, "label": "reader", "color": "#00ff00"}]
    g["6"]["inputs"]["regions_json"] = json.dumps(boxes)
    ui.load_api(g)
    saved = ui.page.evaluate("() => app.graph.serialize()")
    ui.page.evaluate("async (wf) => { app.graph.clear(); await app.loadGraphData(wf); }", saved)
    ui.settle()
    assert editor_boxes(ui, 6) == boxes  # API format after a save/load
    editor = ui.widget_element(6, "regions_json")
    assert editor.query_selector(".mixofshow-box-label").inner_text() == "1: reader"
    assert editor.query_selector(".mixofshow-prompt").input_value() == "a <u1>"


def test_from_pose_fills_the_boxes_with_the_pose_regions_detector(ui):
    g = editor_graph()
    g["12"] = {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": POSE}}
    g["6"]["inputs"].update(image=["12", 0], regions_json=json.dumps([{"top": 0, "left": 0, "bottom": 10,
                                                                       "right": 10, "prompt": "a <u1> <u2>"}]))
    ui.load_api(g)
    ui.show_node(6)
    editor = ui.widget_element(6, "regions_json")
    ui.page.wait_for_function("(el) => el.querySelector('.mixofshow-stage img').naturalWidth === 1024", arg=editor)
    editor.query_selector("button:text('From pose')").click()
    ui.page.wait_for_function("(el) => el.querySelectorAll('.mixofshow-box').length === 3", arg=editor, timeout=15000)
    pose = np.asarray(Image.open(ui.server.base / "custom_nodes" / "mixofshow" / "assets" / "poses" / POSE)
                      .convert("RGB"))
    expected = [list(b) for b in find_pose_boxes(pose, margin=0.05)]
    boxes = editor_boxes(ui, 6)
    assert [[b["top"], b["left"], b["bottom"], b["right"]] for b in boxes] == expected
    assert boxes[0]["prompt"] == "a <u1> <u2>" and boxes[1]["prompt"] == ""  # box 1 kept its prompt
    assert "3 people found" in editor.inner_text()
    ui.shot("editor-from-pose")


def test_regions_from_pose_shows_its_preview_after_a_run(ui):
    g = tiny_graph(**{
        "12": {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": POSE}},
        "13": {"class_type": "MixOfShowPoseRegions", "inputs": {
            "image": ["12", 0], "clip": ["2", 1], "concepts": ["2", 2], "margin": 0.05, "control_strength": 1.0,
            "prompts": f"a {' '.join(TINY_TOKENS)}\na lamp\na dog", "negative": ""}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["13", 2]}},
    })
    ui.load_api(g)
    entry = queue_and_wait(ui)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert entry["outputs"]["13"]["images"]
    shown = preview_shown(ui, 13)
    assert colour_pixels(shown, RED) > 30, "the pose with the first region in red"
    ui.shot("pose-regions-preview")


def test_the_routes_refuse_bad_requests_with_a_message(server):
    def status(path, body=None):
        return server.get_status(path) if body is None else server.post_json(path, body)

    assert status("/api/mixofshow/tokens?name=ui_tiny.pth") == (200, {"name": "ui_tiny.pth",
                                                                      "tokens": list(TINY_TOKENS)})
    code, body = status("/api/mixofshow/tokens?name=nobody.pth")
    assert code == 404 and "nobody.pth" in body["error"]
    code, body = status("/api/mixofshow/pose_boxes", {"image": {"filename": "../../main.py", "type": "input"}})
    assert code == 400 and "outside the input folder" in body["error"]
    code, body = status("/api/mixofshow/pose_boxes", {"image": {"pose": POSE}, "margin": 3})
    assert code == 400 and "margin" in body["error"]
    assert status("/api/mixofshow/poses/nope.png")[0] == 404
