"""Region nodes: Region, Box to Mask (two spellings), Pose Box to Mask, Regions from Pose (docs/design.md §8)."""
from __future__ import annotations

from comfy_api.latest import io

from .glue.previews import preview_ui, regions_preview
from .glue.regions import add_region, box_mask, pose_box_mask, pose_regions
from .glue.schema import PackNode, schema
from .names import CONCEPTS, REGIONS, REGIONS_CATEGORY

_MAX_SIZE = 16384


class RegionNode(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowRegion", display_name="Region (Mix-of-Show)", category=REGIONS_CATEGORY,
            description="One region of a regional (multi-concept) sampling: inside the mask, cross-attention uses "
                        "this region's prompts instead of the global ones (overlaps are averaged, soft masks weight). "
                        "Chain Region nodes to add more regions. Only the first entry of each CONDITIONING is used.",
            search_aliases=("regional prompt", "multi character", "area prompt", "mask prompt", "attention couple"),
            inputs=[
                io.Conditioning.Input("positive", tooltip="Prompt for this region (Text Encode with Concepts or "
                                                          "CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for this region."),
                io.Mask.Input("mask", tooltip="Where the region is, at any resolution (resized to every layer; a box "
                                              "from the pack's box nodes keeps Mix-of-Show's per-layer box rule)."),
                REGIONS.Input("regions", optional=True, tooltip="Regions to add this one to."),
                io.Float.Input("control_strength", optional=True, default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Factor on ControlNet/T2I-Adapter residuals inside this region "
                                       "(1 = unchanged)."),
                io.Model.Input("model", optional=True,
                               tooltip="This region's character: a MODEL from Load ED-LoRA, LoRA as Concept or the "
                                       "stock Load LoRA, applied on the sampling MODEL's base. Its LoRA acts inside "
                                       "this region only, in the same UNet pass (no fusion needed). Encode the "
                                       "region's prompt with the same chain's CLIP."),
            ],
            outputs=[REGIONS.Output(display_name="regions", tooltip="The regions so far, for the Regional "
                                                                    "KSampler / Guider.")],
        )

    @classmethod
    def execute(cls, positive, negative, mask, regions=None, control_strength=1.0, model=None) -> io.NodeOutput:
        return io.NodeOutput(add_region(regions, positive, negative, mask, control_strength, model))


def _size_input(name: str, tooltip: str) -> io.Int.Input:
    return io.Int.Input(name, default=512, min=8, max=_MAX_SIZE, step=8, tooltip=tooltip)


def _pixel_input(name: str, default: int, tooltip: str, minimum: int = 0) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=minimum, max=_MAX_SIZE, step=1, tooltip=tooltip)


_MASK_OUT = io.Mask.Output(display_name="mask", tooltip="[1, height, width]: 1 inside the box, 0 outside; it "
                                                        "remembers its box for the Region node.")


class BoxMask(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowBoxMask", display_name="Box to Mask (Mix-of-Show)", category=REGIONS_CATEGORY,
            description="A rectangular MASK [1, height, width]: 1 inside [top:bottom, left:right] (pixels, bottom "
                        "and right exclusive, as in Mix-of-Show's box files), 0 outside.",
            search_aliases=("box mask", "rectangle mask", "bounding box", "region box"),
            inputs=[
                _size_input("width", "Width of the output image in pixels."),
                _size_input("height", "Height of the output image in pixels."),
                _pixel_input("top", 0, "First row of the box."),
                _pixel_input("left", 0, "First column of the box."),
                _pixel_input("bottom", 512, "Row after the last row of the box (exclusive)."),
                _pixel_input("right", 256, "Column after the last column of the box (exclusive)."),
            ],
            outputs=[_MASK_OUT],
        )

    @classmethod
    def execute(cls, width, height, top, left, bottom, right) -> io.NodeOutput:
        return io.NodeOutput(box_mask(height, width, top, left, bottom, right))


class BoxMaskXYWH(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowBoxMaskXYWH", display_name="Box to Mask, x/y/width/height (Mix-of-Show)",
            category=REGIONS_CATEGORY,
            description="A rectangular MASK [1, height, width]: 1 inside the box at (x, y) of size box_width × "
                        "box_height, 0 outside.",
            search_aliases=("box mask", "rectangle mask", "bounding box", "region box"),
            inputs=[
                _size_input("width", "Width of the output image in pixels."),
                _size_input("height", "Height of the output image in pixels."),
                _pixel_input("x", 0, "Left edge of the box."),
                _pixel_input("y", 0, "Top edge of the box."),
                _pixel_input("box_width", 256, "Width of the box in pixels.", minimum=1),
                _pixel_input("box_height", 512, "Height of the box in pixels.", minimum=1),
            ],
            outputs=[_MASK_OUT],
        )

    @classmethod
    def execute(cls, width, height, x, y, box_width, box_height) -> io.NodeOutput:
        return io.NodeOutput(box_mask(height, width, y, x, y + box_height, x + box_width))


_MARGIN_TOOLTIP = "Grow each box by this fraction of the image size."


class PoseBoxMask(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowPoseBoxMask", display_name="Pose Box to Mask (Mix-of-Show)",
            category=REGIONS_CATEGORY,
            description="The box around one person of a pose (OpenPose skeleton on black) or line-art condition "
                        "image, as a MASK the size of the image. People are numbered left to right from 0; 'count' "
                        "says how many were found.",
            search_aliases=("openpose box", "pose mask", "person box"),
            inputs=[
                io.Image.Input("image", tooltip="OpenPose skeletons (or line art) on black."),
                io.Int.Input("index", default=0, min=0, max=63, tooltip="Which person, left to right, from 0."),
                io.Float.Input("margin", default=0.05, min=0.0, max=0.5, step=0.01, tooltip=_MARGIN_TOOLTIP),
            ],
            outputs=[_MASK_OUT, io.Int.Output(display_name="count", tooltip="How many people were found.")],
        )

    @classmethod
    def execute(cls, image, index, margin) -> io.NodeOutput:
        return io.NodeOutput(*pose_box_mask(image, index, margin))


class PoseRegions(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowPoseRegions", display_name="Regions from Pose (Mix-of-Show)",
            category=REGIONS_CATEGORY,
            description="Regions straight from a pose image: one region per OpenPose skeleton found (left to right, "
                        "grown by a margin), each with the prompt on the matching line of 'prompts'. Outputs the "
                        "regions and their masks (to preview).",
            search_aliases=("openpose regions", "regional prompt", "multi character", "pose regions"),
            inputs=[
                io.Image.Input("image", tooltip="OpenPose skeletons on black, the size of the output image."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompts (from Load ED-LoRA or fusion)."),
                io.String.Input("prompts", multiline=True, tooltip="One line per person, left to right, e.g. "
                                                                   "'a <potter1> <potter2>, in a robe'."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt used in every region."),
                io.Float.Input("margin", default=0.05, min=0.0, max=0.5, step=0.01, tooltip=_MARGIN_TOOLTIP),
                CONCEPTS.Input("concepts", optional=True, tooltip="Concepts the prompts use."),
                REGIONS.Input("regions", optional=True, tooltip="Regions to add these to."),
                io.Float.Input("control_strength", optional=True, default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Factor on ControlNet/T2I-Adapter residuals inside these regions."),
            ],
            outputs=[
                REGIONS.Output(display_name="regions", tooltip="One region per person found."),
                io.Mask.Output(display_name="masks", tooltip="[R, H, W]: the regions' masks, left to right."),
                io.Image.Output(display_name="preview", tooltip="The pose with every region in its colour and label "
                                                                "(also shown in the node)."),
            ],
        )

    @classmethod
    def execute(cls, image, clip, prompts, negative, margin, concepts=None, regions=None,
                control_strength=1.0) -> io.NodeOutput:
        regions_out, masks = pose_regions(image, clip, prompts, negative, margin, concepts, regions, control_strength)
        preview = regions_preview(regions_out, image)
        return io.NodeOutput(regions_out, masks, preview, ui=preview_ui(preview))


NODES = [RegionNode, BoxMask, BoxMaskXYWH, PoseBoxMask, PoseRegions]
