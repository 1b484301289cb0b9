"""Editor nodes: the Regions Editor (boxes drawn in the web UI, js/regions_editor.js), Load Reference
Pose (the poses shipped in assets/poses), and the small HTTP routes the web UI uses: pose boxes from
the same detector as Regions from Pose, an ED-LoRA file's concept tokens, the shipped pose images."""
from __future__ import annotations

import asyncio
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps
from safetensors import safe_open

import folder_paths

from ..fusion.bundle import is_bundle
from ..fusion.concepts import ConceptError, ConceptSet
from ..fusion.edlora import EDLoRAError, load_edlora
from ..fusion.preview import Color, parse_color
from ..fusion.regional import find_pose_boxes
from .common import CONCEPTS, REGIONS, REGIONS_CATEGORY, PackNode, check_choices, schema
from .edlora_nodes import edlora_path
from .layerwise import encode_with_concepts
from .previews import preview_ui, regions_preview
from .region_nodes import add_region
from .regions import box_mask

POSES_DIR = Path(__file__).resolve().parents[1] / "assets" / "poses"
_POSE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
_MAX_SIZE = 16384
_MAX_STRENGTH = 10.0
DEFAULT_MARGIN = 0.05  # Regions from Pose's default


# --------------------------------------------------------------------------- images

def reference_poses() -> list[str]:
    """The pose images shipped in assets/poses."""
    if not POSES_DIR.is_dir():
        return []
    return sorted(p.name for p in POSES_DIR.iterdir() if p.suffix.lower() in _POSE_EXTENSIONS and p.is_file())


def _pose_path(name: str) -> Path:
    if name not in reference_poses():
        raise ValueError(f"'{name}' is not one of the shipped poses ({', '.join(reference_poses()) or 'none'})")
    return POSES_DIR / name


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file (EXIF rotation applied, as Load Image does)."""
    with Image.open(path) as img:
        return np.array(ImageOps.exif_transpose(img).convert("RGB"))


def to_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> ComfyUI IMAGE ``[1, H, W, 3]`` float in [0, 1]."""
    return torch.from_numpy(rgb).float().div_(255.0)[None]


def _user_image_path(ref: dict) -> str:
    """The file of a ``{filename, subfolder, type}`` reference (as /view takes), kept inside its folder."""
    kind = str(ref.get("type") or "input")
    folder = folder_paths.get_directory_by_type(kind)
    if folder is None:
        raise ValueError(f"unknown image folder type '{kind}' (input, output or temp)")
    filename = str(ref.get("filename") or "")
    if not filename:
        raise ValueError("no image file named")
    path = os.path.abspath(os.path.join(folder, str(ref.get("subfolder") or ""), filename))
    if os.path.commonpath([path, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise ValueError(f"'{filename}' is outside the {kind} folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image '{filename}' in the {kind} folder")
    return path


def pose_boxes_for(source: dict, margin: float = DEFAULT_MARGIN) -> dict:
    """What the editor's "from pose" button gets: the image size and one ``[top, left, bottom, right]``
    box per skeleton, left to right, from the detector Regions from Pose uses. ``source`` is
    ``{"pose": name}`` (a shipped pose) or an image reference ``{filename, subfolder, type}``."""
    margin = float(margin)
    if not 0.0 <= margin <= 0.5:
        raise ValueError(f"margin must be between 0 and 0.5, got {margin}")
    path = _pose_path(str(source["pose"])) if source.get("pose") else _user_image_path(source)
    rgb = read_rgb(path)
    boxes = find_pose_boxes(rgb, margin=margin)
    return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "boxes": [list(b) for b in boxes]}


# --------------------------------------------------------------------------- concept tokens

@functools.lru_cache(maxsize=64)
def _file_tokens(path: str, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    if path.endswith(".safetensors") and is_bundle(path):
        with safe_open(path, framework="pt") as f:
            concepts = json.loads((f.metadata() or {}).get("concepts", "[]"))
        return tuple(tok for c in concepts for tok in c.get("tokens", ()))
    return tuple(load_edlora(path).tokens)


def tokens_of(edlora_name: str) -> list[str]:
    """The concept tokens a Load ED-LoRA file defines (what the node shows and autocomplete offers)."""
    path = edlora_path(edlora_name)
    stat = os.stat(path)
    return list(_file_tokens(path, stat.st_mtime_ns, stat.st_size))


# --------------------------------------------------------------------------- editor boxes

@dataclass(frozen=True)
class EditorBox:
    """One box of the editor, in pixels of the output image (bottom/right exclusive)."""
    top: int
    left: int
    bottom: int
    right: int
    prompt: str
    negative: str = ""
    control_strength: float = 1.0
    label: str = ""
    color: Color | None = None


def _number(box: dict, key: str, where: str, default: float | None = None) -> float:
    value = box.get(key, default)
    if value is None:
        raise ValueError(f"{where}: '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: '{key}' must be a finite number, got {json.dumps(value)}")
    return float(value)


def _text(box: dict, key: str, where: str) -> str:
    value = box.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be text, got {json.dumps(value)}")
    return value


def parse_boxes(regions_json: str) -> list[EditorBox]:
    """The editor's JSON as boxes; every problem raises :class:`ValueError` naming the box (from 1)."""
    try:
        data = json.loads(regions_json)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"Regions Editor: regions_json is not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError("Regions Editor: regions_json must be a JSON list of boxes")
    if not data:
        raise ValueError("Regions Editor: no boxes; draw at least one box in the editor (or click 'from pose')")
    boxes = []
    for i, box in enumerate(data):
        where = f"Regions Editor box {i + 1}"
        if not isinstance(box, dict):
            raise ValueError(f"{where}: expected an object with top, left, bottom, right and prompt")
        edges = [round(_number(box, k, where)) for k in ("top", "left", "bottom", "right")]
        prompt = _text(box, "prompt", where)
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty; write who or what is in this box")
        strength = _number(box, "control_strength", where, 1.0)
        if not 0.0 <= strength <= _MAX_STRENGTH:
            raise ValueError(f"{where}: control_strength must be between 0 and {_MAX_STRENGTH:g}, got {strength:g}")
        color = _text(box, "color", where)
        try:
            rgb = parse_color(color) if color else None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        boxes.append(EditorBox(*edges, prompt=prompt, negative=_text(box, "negative", where),
                               control_strength=strength, label=_text(box, "label", where).strip(), color=rgb))
    return boxes


def clamp_box(box: EditorBox, height: int, width: int, index: int) -> tuple[int, int, int, int]:
    """The box clamped to the image; an empty result raises :class:`ValueError` naming the box."""
    top, bottom = max(0, min(box.top, height)), max(0, min(box.bottom, height))
    left, right = max(0, min(box.left, width)), max(0, min(box.right, width))
    if bottom <= top or right <= left:
        raise ValueError(f"Regions Editor box {index + 1}: [top, left, bottom, right] = "
                         f"[{box.top}, {box.left}, {box.bottom}, {box.right}] is empty inside the {width}×{height} "
                         f"image (clamped to [{top}, {left}, {bottom}, {right}])")
    return top, left, bottom, right


def editor_regions(clip, regions_json: str, width: int, height: int, image=None, concepts=None, regions=None):
    """Regions, masks ``[R, H, W]`` and preview IMAGE of the editor's boxes (see RegionsEditor)."""
    boxes = parse_boxes(regions_json)
    if image is not None:
        height, width = int(image.shape[-3]), int(image.shape[-2])
    concepts = concepts or ConceptSet()
    earlier = len(regions or ())
    negatives: dict[str, list] = {}
    masks = []
    for i, box in enumerate(boxes):
        mask = box_mask(height, width, *clamp_box(box, height, width, i))
        try:
            positive = encode_with_concepts(clip, box.prompt, concepts)
            if box.negative not in negatives:
                negatives[box.negative] = encode_with_concepts(clip, box.negative, concepts)
        except ConceptError as e:
            raise ConceptError(f"Regions Editor box {i + 1}: {e}") from e
        regions = add_region(regions, positive, negatives[box.negative], mask, box.control_strength, None,
                             box.label)
        masks.append(mask)
    colors = [None] * earlier + [b.color for b in boxes]
    preview = regions_preview(regions, image, colors, size=(height, width))
    return regions, torch.cat(masks), preview


class RegionsEditor(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowRegionsEditor", display_name="Regions Editor (Mix-of-Show)",
            category=REGIONS_CATEGORY,
            description="Draw the regions: boxes over the pose (or any reference image, or a blank canvas), each "
                        "with its own prompt, negative prompt (concept tokens welcome) and control strength. Drag on "
                        "the picture to draw a box, drag a box to move it, drag a corner to resize it; 'from pose' "
                        "starts from the skeletons found in the image. Outputs the same regions as the box nodes.",
            search_aliases=("region editor", "draw regions", "box editor", "regional prompt", "multi character",
                            "bounding box", "area prompt"),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP that encodes the boxes' prompts (from Load ED-LoRA or "
                                              "Gradient Fusion)."),
                io.Int.Input("width", default=1024, min=8, max=_MAX_SIZE, step=8,
                             tooltip="Width of the blank canvas when no image is connected."),
                io.Int.Input("height", default=512, min=8, max=_MAX_SIZE, step=8,
                             tooltip="Height of the blank canvas when no image is connected."),
                io.String.Input("regions_json", default="[]",
                                tooltip="The boxes, as the editor saves them: a JSON list of {top, left, bottom, "
                                        "right, prompt, negative, control_strength, label, color} in pixels of the "
                                        "output image (bottom and right exclusive)."),
                io.Image.Input("image", optional=True,
                               tooltip="Pose or reference image, the size of the output image: shown under the boxes "
                                       "and searched by 'from pose'; its size wins over width/height."),
                CONCEPTS.Input("concepts", optional=True, tooltip="Concepts the prompts use."),
                REGIONS.Input("regions", optional=True, tooltip="Regions to add these to."),
            ],
            outputs=[
                REGIONS.Output(display_name="regions", tooltip="One region per box, in the editor's order."),
                io.Mask.Output(display_name="masks", tooltip="[R, H, W]: the boxes' masks, in the editor's order."),
                io.Image.Output(display_name="preview", tooltip="The image (or a grey canvas) with every region in "
                                                                "its colour and label (also shown in the node)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, regions_json) -> bool | str:
        try:
            parse_boxes(regions_json)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, clip, width, height, regions_json, image=None, concepts=None, regions=None) -> io.NodeOutput:
        regions_out, masks, preview = editor_regions(clip, regions_json, width, height, image, concepts, regions)
        ui = preview_ui(preview)
        background = None if image is None else preview_ui(image[:1])["images"][0]
        ui["mixofshow_canvas"] = [{"width": int(masks.shape[-1]), "height": int(masks.shape[-2]),
                                   "background": background}]
        return io.NodeOutput(regions_out, masks, preview, ui=ui)


class LoadReferencePose(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowLoadReferencePose", display_name="Load Reference Pose (Mix-of-Show)",
            category=REGIONS_CATEGORY,
            description="One of the OpenPose images the pack ships (assets/poses, from Mix-of-Show's validation set, "
                        "Apache-2.0), for the regions and the OpenPose adapter: no copying into input/ needed. Its "
                        "width and height are the output image's size.",
            search_aliases=("reference pose", "openpose image", "pose image", "load pose"),
            inputs=[io.Combo.Input("pose", options=reference_poses(), tooltip="A pose image shipped with the pack.")],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The pose image (OpenPose skeletons on black)."),
                io.Int.Output(display_name="width", tooltip="Its width in pixels (for Empty Latent Image)."),
                io.Int.Output(display_name="height", tooltip="Its height in pixels."),
            ],
        )

    @classmethod
    def validate_inputs(cls, pose) -> bool | str:
        return check_choices(cls, pose=pose)

    @classmethod
    def execute(cls, pose) -> io.NodeOutput:
        rgb = read_rgb(_pose_path(pose))
        return io.NodeOutput(to_image(rgb), int(rgb.shape[1]), int(rgb.shape[0]))


# --------------------------------------------------------------------------- HTTP routes

def _error(web, status: int, e: Exception):
    return web.json_response({"error": str(e)}, status=status)


def _register_routes() -> None:
    """Adds the web UI's routes to ComfyUI's server (absent when the pack is imported without one)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    routes = server.routes

    @routes.get("/mixofshow/tokens")
    async def get_tokens(request):
        name = request.query.get("name", "")
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(None, tokens_of, name)
        except FileNotFoundError as e:
            return _error(web, 404, e)
        except (EDLoRAError, ValueError, OSError) as e:
            return _error(web, 400, e)
        return web.json_response({"name": name, "tokens": tokens})

    @routes.post("/mixofshow/pose_boxes")
    async def post_pose_boxes(request):
        try:
            body = await request.json()
            source = body.get("image") or {}
            result = await asyncio.get_running_loop().run_in_executor(
                None, pose_boxes_for, source, body.get("margin", DEFAULT_MARGIN))
        except FileNotFoundError as e:
            return _error(web, 404, e)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            return _error(web, 400, e)
        return web.json_response(result)

    @routes.get("/mixofshow/poses/{name}")
    async def get_pose(request):
        try:
            path = _pose_path(request.match_info["name"])
        except ValueError as e:
            return _error(web, 404, e)
        return web.FileResponse(path)


_register_routes()

NODES = [RegionsEditor, LoadReferencePose]
