"""Editor nodes: the Regions Editor (boxes drawn in the web UI, js/regions_editor.js), Load Reference
Pose (the poses shipped in assets/poses), and the small HTTP routes the web UI uses: pose boxes from
the same detector as Regions from Pose, an ED-LoRA file's concept tokens, the shipped pose images."""
from __future__ import annotations

from comfy_api.latest import io

from ..fusion.regions.editor_boxes import parse_boxes
from .glue.images import pose_path, read_rgb, reference_poses, to_image
from .glue.previews import preview_ui
from .glue.regions import editor_regions
from .glue.schema import PackNode, check_choices, schema
from .names import CONCEPTS, REGIONS, REGIONS_CATEGORY, UI_CANVAS

_MAX_SIZE = 16384


# --------------------------------------------------------------------------- images


# --------------------------------------------------------------------------- concept tokens


# --------------------------------------------------------------------------- editor boxes


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
        ui[UI_CANVAS] = [{"width": int(masks.shape[-1]), "height": int(masks.shape[-2]),
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
        rgb = read_rgb(pose_path(pose))
        return io.NodeOutput(to_image(rgb), int(rgb.shape[1]), int(rgb.shape[0]))


# --------------------------------------------------------------------------- HTTP routes



NODES = [RegionsEditor, LoadReferencePose]
