"""Training nodes: ED-LoRA Training Set, Train ED-LoRA and Save ED-LoRA (docs/design.md §14). The work is in
nodes/glue/training.py (the loop inside ComfyUI) and fusion/train/ (training set, losses, schedule, presets)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..fusion.errors import TrainingError
from ..fusion.files.edlora import save_edlora, unique_output_path
from ..fusion.train.dataset import TEMPLATES
from ..fusion.train.settings import (
    AUTO_PRESET,
    PRESET_CHOICES,
    PRESETS,
    TEXT_SCOPES,
    TRAINING_DTYPES,
    UNET_SCOPES,
)
from .glue.fusion_run import NodeProgress
from .glue.schema import PackNode, advanced, schema
from .glue.training import train_edlora, training_folders, training_set_from_inputs
from .names import CONCEPTS, EDLORA_FOLDER, LOSS_MAP, TRAINING, TRAINSET, UI_CONCEPT_SET

FROM_PRESET = "preset"
_PRESETS_SHOWN = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())


def _int_field(name: str, tooltip: str, maximum: int = 1 << 20, step: int = 1) -> io.Input:
    return advanced(io.Int.Input(name, default=0, min=0, max=maximum, step=step, optional=True,
                                 tooltip=f"{tooltip} 0 = the preset's value."))


def _float_field(name: str, tooltip: str, step: float = 1e-6) -> io.Input:
    return advanced(io.Float.Input(name, default=-1.0, min=-1.0, max=100.0, step=step, optional=True,
                                   tooltip=f"{tooltip} -1 = the preset's value."))


def _choice_field(name: str, choices: tuple[str, ...], tooltip: str) -> io.Input:
    return advanced(io.Combo.Input(name, options=[FROM_PRESET, *choices], default=FROM_PRESET, optional=True,
                                   tooltip=f"{tooltip} preset = the preset's value."))


class EDLoRATrainingSet(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowEDLoRATrainingSet", display_name="ED-LoRA Training Set (Mix-of-Show)",
            category=TRAINING, is_input_list=True,
            description="Collects the images of one character (any sizes: a batch, a list, or a folder of the "
                        "input directory), optional subject masks and captions for Train ED-LoRA. Nothing is "
                        "encoded here: every training step augments and encodes its own batch.",
            search_aliases=("ED-LoRA dataset", "training images", "character dataset", "Mix-of-Show training"),
            inputs=[
                io.Image.Input("images", optional=True,
                               tooltip="The character's images (a batch or a list; any sizes). Or use folder."),
                io.Mask.Input("masks", optional=True,
                              tooltip="One subject mask per image, each of its image's size (white = the "
                                      "character; e.g. Load Image (as Mask) on a black-and-white mask's red "
                                      "channel). Needed by the real-person preset (subject-masked loss)."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="One caption per image (one per line, or a list), with <TOK> where the "
                                        "concept goes, e.g. 'a <TOK> in a red coat, smiling'. One line = every "
                                        "image; empty = '<TOK>'."),
                io.Combo.Input("folder", options=training_folders(),
                               tooltip="(none), or a folder of ComfyUI's input directory holding a training set "
                                       "the way Mix-of-Show's datasets are laid out: image/ (or the images "
                                       "themselves), optional mask/ and caption/ (<name>.png, <name>.txt). Added "
                                       "after the connected images."),
                io.Combo.Input("templates", options=list(TEMPLATES), default="human",
                               tooltip="Each caption is wrapped in a random template of this kind ('a photo of "
                                       "{}', ...); none = the caption as it is."),
                io.Int.Input("keep_first", default=1, min=0, max=100,
                             tooltip="Comma-separated caption pieces kept in front; the rest are shuffled "
                                     "every step."),
                io.Float.Input("crop_p", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability that a portrait image keeps its top part (face and upper "
                                       "body) instead of a random square crop."),
            ],
            outputs=[TRAINSET.Output(display_name="training_set", tooltip="The training set, for Train ED-LoRA.")],
        )

    @classmethod
    def execute(cls, folder, templates, keep_first, crop_p, images=None, masks=None, captions=None) -> io.NodeOutput:
        trainset = training_set_from_inputs(images, masks, captions, folder[0], templates[0], keep_first[0],
                                            crop_p[0])
        return io.NodeOutput(trainset, ui={"text": [trainset.describe()]})


class TrainEDLoRA(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowTrainEDLoRA", display_name="Train ED-LoRA (Mix-of-Show)", category=TRAINING,
            description="Trains one Mix-of-Show ED-LoRA: new concept tokens with their own embedding in every "
                        "cross-attention layer, a text-encoder LoRA and a UNet LoRA, with the masked denoising loss "
                        "and the attention regulariser. Outputs what Load ED-LoRA gives (model, clip and concept "
                        "set), ready for Text Encode with Concepts, regions and Gradient Fusion; Save ED-LoRA writes "
                        f"it to a file. The base model is never changed. Presets: {_PRESETS_SHOWN}.",
            search_aliases=("train ED-LoRA", "train character", "train concept", "Mix-of-Show training",
                            "textual inversion", "P+"),
            inputs=[
                io.Model.Input("model", tooltip="The base model to train on (SD1.x)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint (encodes the training images)."),
                TRAINSET.Input("training_set", tooltip="From ED-LoRA Training Set."),
                io.String.Input("concept_tokens", default="<new1>+<new2>",
                                tooltip="The new tokens, joined with + (or spaces): the Mix-of-Show way is two, "
                                        "e.g. <hina1>+<hina2>. Prompts then write them: 'a <hina1> <hina2>'."),
                io.String.Input("init_tokens", default="<rand-0.013>+person",
                                tooltip="How each token starts, joined with +: <rand-σ> (a random vector) or a "
                                        "class word of one token (man, woman, girl, dog). The reference uses "
                                        "<rand-0.013>+<class word>."),
                io.Combo.Input("preset", options=list(PRESET_CHOICES), default=AUTO_PRESET,
                               tooltip="The reference configuration every field below starts from (auto: the "
                                       f"model family's). {_PRESETS_SHOWN}."),
                io.Int.Input("steps", default=0, min=0, max=1_000_000,
                             tooltip="Optimiser steps. 0 = the reference's: images × repeats / (batch_size × "
                                     "grad_accum)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of everything random: initial rows and LoRA, batches, augmentation, "
                                     "noise and timesteps. The same seed gives the same training."),
                CONCEPTS.Input("concepts", optional=True,
                               tooltip="A concept set to add the trained concept to (its tokens must differ)."),
                advanced(io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto",
                                        optional=True,
                                        tooltip="bf16: autocast over float32 trainable parameters (GPUs); fp32: "
                                                "full precision. auto: bf16 on a CUDA GPU that has it, else fp32.")),
                advanced(io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                          tooltip="Recompute activations in the backward pass (each block runs "
                                                  "twice): much less memory, slower. For GPUs with little "
                                                  "memory.")),
                _int_field("resolution", "Square training canvas in pixels (512 for SD1.5).", 8192, 8),
                _int_field("batch_size", "Images per forward pass."),
                _int_field("grad_accum", "Forward passes per optimiser step."),
                _int_field("repeats", "How often each image is drawn per epoch (sets steps when steps is 0)."),
                _float_field("lr_emb", "Learning rate of the concept rows (first text encoder)."),
                _float_field("lr_te", "Learning rate of the text-encoder LoRA (first text encoder)."),
                _float_field("lr_unet", "Learning rate of the UNet LoRA."),
                _int_field("rank_te", "Rank of the text-encoder LoRA (first text encoder).", 1024),
                _int_field("rank_unet", "Rank of the UNet LoRA.", 1024),
                _choice_field("te_scope", TEXT_SCOPES, "Text-encoder modules with a LoRA: attention = q, k, v, "
                                                       "out; attention+mlp adds fc1, fc2."),
                _choice_field("unet_scope", UNET_SCOPES, "UNet modules with a LoRA: attention = attn1/attn2 "
                                                         "q, k, v, out; transformer adds the feed-forward and "
                                                         "proj_in/proj_out."),
                _float_field("noise_offset", "Noise offset (a per-channel constant added to the noise).", 0.001),
                _float_field("attn_reg_weight", "Weight of the attention regulariser (keeps the concept tokens' "
                                                "cross-attention on the subject); 0 = off.", 0.001),
                _choice_field("reg_full_identity", ("on", "off"),
                              "on: the subject token's attention map is pulled towards the whole mask (the "
                              "reference's Thanos setting); off: only away from the background."),
                _choice_field("use_mask_loss", ("on", "off"), "on: the loss counts only the subject (needs "
                                                              "masks); off: the whole pasted image."),
                _float_field("emb_norm_threshold", "Freeze the concept rows once their mean norm reaches this "
                                                   "(first text encoder).", 0.01),
                _float_field("weight_decay", "AdamW weight decay.", 0.001),
                _float_field("lr_emb_g", "SDXL: learning rate of the second text encoder's concept rows."),
                _float_field("lr_te_g", "SDXL: learning rate of the second text encoder's LoRA."),
                _int_field("rank_te_g", "SDXL: rank of the second text encoder's LoRA.", 1024),
                _float_field("emb_norm_threshold_g", "SDXL: norm threshold of the second text encoder's rows.", 0.01),
                advanced(io.Boolean.Input("reference_quirks", default=False, optional=True,
                                          tooltip="SDXL: reproduce the reference trainer's defects (second-encoder "
                                                  "rows left random, one stop flag for both encoders, wrong size "
                                                  "conditioning). Off: the fixed behaviour.")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the trained UNet LoRA."),
                io.Clip.Output(display_name="clip", tooltip="A clone of the CLIP with the trained text-encoder "
                                                            "LoRA."),
                CONCEPTS.Output(display_name="concepts", tooltip="The concept set with the trained concept (its "
                                                                 "tokens and layer-wise tables)."),
                LOSS_MAP.Output(display_name="loss_map", tooltip="Loss per step (loss), the attention regulariser "
                                                                 "(attn_reg) and the rows' mean norm (norm_l): "
                                                                 "plot it with Plot Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Optimiser steps trained."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, training_set, concept_tokens, init_tokens, preset, steps, seed,
                concepts=None, training_dtype="auto", gradient_checkpointing=False, reference_quirks=False,
                **fields) -> io.NodeOutput:
        overrides = {"steps": steps, "seed": seed, "training_dtype": training_dtype,
                     "gradient_checkpointing": gradient_checkpointing, "reference_quirks": reference_quirks}
        for name, value in fields.items():
            if isinstance(value, str):
                overrides[name] = None if value == FROM_PRESET else {"on": True, "off": False}.get(value, value)
            elif isinstance(value, float):
                overrides[name] = None if value < 0 else value
            else:
                overrides[name] = None if value is None or value <= 0 else value
        hidden = getattr(cls, "hidden", None)
        progress = NodeProgress(getattr(hidden, "unique_id", None) if hidden is not None else None)
        result = train_edlora(model, clip, vae, training_set, concept_tokens, init_tokens, preset, overrides,
                              concepts, progress)
        losses = result.loss_map["loss"]
        text = [f"{' '.join(result.edlora.tokens)}: {result.steps} steps, loss {losses[0]:.4f} → {losses[-1]:.4f}"]
        return io.NodeOutput(result.model, result.clip, result.concepts, result.loss_map, result.steps,
                             ui={"text": text, UI_CONCEPT_SET: [result.concepts.describe()]})


class SaveEDLoRA(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowSaveEDLoRA", display_name="Save ED-LoRA (Mix-of-Show)", category=TRAINING,
            is_output_node=True,
            description="Writes every concept Train ED-LoRA made in this concept set to models/edloras as a flat "
                        ".safetensors ED-LoRA (never a pickle), with the training settings in its metadata. Load "
                        "ED-LoRA loads it.",
            search_aliases=("save ED-LoRA", "export ED-LoRA", "save trained concept"),
            inputs=[
                CONCEPTS.Input("concepts", tooltip="The concepts output of Train ED-LoRA."),
                io.String.Input("filename", default="edlora_trained",
                                tooltip="File name in models/edloras (.safetensors is added)."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing file of that name. Off: a numeric suffix is added "
                                         "(name_00001)."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The written file(s) in models/edloras.")],
        )

    @classmethod
    def execute(cls, concepts, filename, overwrite=False) -> io.NodeOutput:
        trained = [c.edlora for c in (concepts.concepts if concepts is not None else ()) if c.edlora.metadata]
        if not trained:
            raise TrainingError("Save ED-LoRA: the concept set holds no concept trained in this graph; connect the "
                                "concepts output of Train ED-LoRA (loaded files are already on disk)")
        folder = folder_paths.get_folder_paths(EDLORA_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        names = []
        for edlora in trained:
            path = unique_output_path(folder, filename, overwrite and len(trained) == 1)
            save_edlora(edlora, path)
            names.append(os.path.basename(path))
        return io.NodeOutput(", ".join(names), ui={"text": [f"{n}: {' '.join(e.tokens)}"
                                                            for n, e in zip(names, trained, strict=True)]})


NODES = [EDLoRATrainingSet, TrainEDLoRA, SaveEDLoRA]
