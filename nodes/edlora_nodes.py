"""Loader nodes: Load ED-LoRA, Text Encode with Concepts, Convert ED-LoRA to safetensors."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

import nodes as comfy_nodes

from ..fusion.files.edlora import convert_to_safetensors, unique_output_path
from .glue.folders import edlora_choices, edlora_path
from .glue.layerwise import encode_with_concepts
from .glue.loading import apply_edlora, apply_lora_concept
from .glue.schema import PackNode, advanced, check_choices, schema
from .names import CONCEPTS, EDLORA_FOLDER, LOADERS, UI_CONCEPT_SET


class LoadEDLoRA(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowLoadEDLoRA", display_name="Load ED-LoRA (Mix-of-Show)", category=LOADERS,
            description="Loads a Mix-of-Show (SD1.x) or Concept Conductor (SDXL) ED-LoRA (.pth or .safetensors), a "
                        "fused bundle or a kohya XTI (P+) embedding: patches clones of MODEL and CLIP with its LoRA "
                        "and adds its concept tokens (e.g. <potter1> <potter2>) to the concept set. Chain loaders to "
                        "use several concepts.",
            search_aliases=("ED-LoRA", "edlora", "P+", "XTI", "character LoRA", "multi character", "concept"),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL model the ED-LoRA was trained on (or a fine-tune "
                                                "of it)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Combo.Input("edlora_name", options=edlora_choices(),
                               tooltip="File in models/edloras (or models/loras)."),
                io.Float.Input("text_encoder_strength", default=0.7, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the text-encoder LoRA (0.7 for sampling, 1.0 for fusion)."),
                io.Float.Input("unet_strength", default=0.7, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the UNet LoRA. Both 0 = embeddings only."),
                CONCEPTS.Input("concepts", optional=True,
                               tooltip="Concept set from an earlier Load ED-LoRA, to chain."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the ED-LoRA's UNet LoRA."),
                io.Clip.Output(display_name="clip",
                               tooltip="A clone of the CLIP with the ED-LoRA's text-encoder LoRA."),
                CONCEPTS.Output(display_name="concepts",
                                tooltip="The concept set: every loaded ED-LoRA's tokens, for Text Encode with "
                                        "Concepts, regions and Gradient Fusion."),
            ],
        )

    @classmethod
    def validate_inputs(cls, edlora_name) -> bool | str:
        return check_choices(cls, edlora_name=edlora_name)

    @classmethod
    def execute(cls, model, clip, edlora_name, text_encoder_strength, unet_strength, concepts=None) -> io.NodeOutput:
        model_out, clip_out, concepts_out = apply_edlora(model, clip, concepts, edlora_path(edlora_name),
                                                         text_encoder_strength, unet_strength)
        own = concepts_out.concepts[len(concepts.concepts) if concepts else 0:]
        text = [" ".join(tok for c in own for tok in c.edlora.tokens)]
        text += [f"⚠ {c.edlora.ignored_summary} — not applied" for c in own if c.edlora.ignored_total]
        text += [f"⚠ {w}" for c in own for w in c.edlora.warnings]
        return io.NodeOutput(model_out, clip_out, concepts_out,
                             ui={"text": text, UI_CONCEPT_SET: [concepts_out.describe()]})


class TextEncodeConcepts(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowTextEncode", display_name="Text Encode with Concepts (Mix-of-Show)",
            category=LOADERS,
            description="CLIP Text Encode that understands ED-LoRA concept tokens: each cross-attention layer (16 in "
                        "SD1.x, 70 in SDXL) gets its own context. Everything the stock encoder supports keeps working "
                        "((word:1.2), long prompts, embedding:name). Without concept tokens it equals the stock node; "
                        "on SDXL the optional size inputs act as in the stock CLIPTextEncodeSDXL.",
            search_aliases=("concept prompt", "layer-wise conditioning", "P+", "ED-LoRA prompt", "CLIP Text Encode"),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP from Load ED-LoRA (or the fusion node)."),
                CONCEPTS.Input("concepts", tooltip="Concept set that defines the tokens used in the text."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="Prompt; write concepts as their tokens, e.g. a <potter1> <potter2>."),
                *[advanced(io.Int.Input(name, optional=True, default=0, min=0, max=comfy_nodes.MAX_RESOLUTION, step=8,
                                        tooltip=tip)) for name, tip in _SIZE_INPUTS.items()],
            ],
            outputs=[io.Conditioning.Output(tooltip="A CONDITIONING carrying one context per cross-attention layer.")],
        )

    @classmethod
    def execute(cls, clip, concepts, text, **sizes) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader "
                               "node your checkpoint does not contain a valid clip or text encoder model.")
        extra = {name: int(value) for name, value in sizes.items() if name in _SIZE_INPUTS and value}
        return io.NodeOutput(encode_with_concepts(clip, text, concepts, "Text Encode with Concepts, input 'text'",
                                                   extra))


# SDXL's size conditioning (what the stock CLIPTextEncodeSDXL sets); 0 leaves the value out, as the stock CLIP Text
# Encode does: ComfyUI then takes the width and height from the latent, crops 0, targets = width and height
_SIZE_INPUTS = {
    "width": "SDXL: the original width the model is told (0 = the latent's width).",
    "height": "SDXL: the original height the model is told (0 = the latent's height).",
    "crop_w": "SDXL: the horizontal crop offset the model is told (0 = none).",
    "crop_h": "SDXL: the vertical crop offset the model is told (0 = none).",
    "target_width": "SDXL: the target width the model is told (0 = the width).",
    "target_height": "SDXL: the target height the model is told (0 = the height).",
}


class ConvertEDLoRA(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowConvertEDLoRA", display_name="Convert ED-LoRA to safetensors (Mix-of-Show)",
            category=LOADERS, is_output_node=True,
            description="Converts an ED-LoRA .pth (either key spelling) into the pack's flat .safetensors layout in "
                        "models/edloras, so it can be shared without pickles.",
            search_aliases=("ED-LoRA convert", "pth to safetensors"),
            inputs=[
                io.Combo.Input("edlora_name", options=edlora_choices(), tooltip="The ED-LoRA file to convert."),
                io.String.Input("output_name", default="", tooltip="Empty = same name, .safetensors"),
                io.Boolean.Input("overwrite", optional=True, default=False,
                                 tooltip="Replace an existing file of that name (never the one being converted). "
                                         "Off: a numeric suffix is added (name_00001)."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="Name of the written file in models/edloras.")],
        )

    @classmethod
    def validate_inputs(cls, edlora_name) -> bool | str:
        return check_choices(cls, edlora_name=edlora_name)

    @classmethod
    def execute(cls, edlora_name, output_name, overwrite=False) -> io.NodeOutput:
        src = edlora_path(edlora_name)
        stem = output_name.strip() or os.path.splitext(os.path.basename(src))[0]
        folder = folder_paths.get_folder_paths(EDLORA_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        dst = unique_output_path(folder, stem, overwrite, source=src,
                                 where="Convert ED-LoRA to safetensors, input 'output_name'")
        edlora = convert_to_safetensors(src, dst)
        name = os.path.basename(dst)
        text = [f"{name}: {' '.join(edlora.tokens)}"]
        if edlora.ignored_total:
            text.append(f"⚠ {edlora.ignored_summary} — not converted")
        return io.NodeOutput(name, ui={"text": text})


class LoRAAsConcept(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowLoRAConcept", display_name="LoRA as Concept (Mix-of-Show)", category=LOADERS,
            description="Loads a plain LoRA (kohya, diffusers or ComfyUI keys: whatever the stock Load LoRA reads) "
                        "like Load LoRA does, and adds it to the concept set as a character named by its trigger "
                        "words, so it can be given its own region (Region's model input) or fused with Gradient "
                        "Fusion next to ED-LoRAs. Trigger words may use embedding:name for textual inversions.",
            search_aliases=("LoRA concept", "character LoRA", "regional LoRA", "LoRA per region", "multi character"),
            inputs=[
                io.Model.Input("model", tooltip="The base SD1.x or SDXL model (or the MODEL of an earlier loader)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="LoRA file in models/loras."),
                io.String.Input("trigger_words", default="",
                                tooltip="The words that name this character in prompts, e.g. 'ohwx woman'. Must "
                                        "differ between concepts."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the LoRA on the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the LoRA on the text encoder."),
                CONCEPTS.Input("concepts", optional=True, tooltip="Concept set from an earlier loader, to chain."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the LoRA."),
                io.Clip.Output(display_name="clip", tooltip="A clone of the CLIP with the LoRA."),
                CONCEPTS.Output(display_name="concepts", tooltip="The concept set with this LoRA added."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name) -> bool | str:
        return check_choices(cls, lora_name=lora_name)

    @classmethod
    def execute(cls, model, clip, lora_name, trigger_words, strength_model, strength_clip,
                concepts=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        model_out, clip_out, concepts_out = apply_lora_concept(model, clip, concepts, path, trigger_words,
                                                               strength_model, strength_clip)
        return io.NodeOutput(model_out, clip_out, concepts_out,
                             ui={"text": [concepts_out.concepts[-1].trigger_words],
                                 UI_CONCEPT_SET: [concepts_out.describe()]})


NODES = [LoadEDLoRA, TextEncodeConcepts, ConvertEDLoRA, LoRAAsConcept]
