"""Regenerate example_workflows/<title>.json (ComfyUI's UI format) and their thumbnails <title>.jpg.

Each example is written as an API-format graph here, loaded into the real web UI (app.loadApiJson, so
widget order and links are exactly what the frontend expects), given positions, groups and notes,
and serialised. Then each one is RUN through the UI on the demo models (tools/demo.py writes them)
and its region preview, which a node shows after the run, becomes the thumbnail: a sampled image from
random weights is noise.

The examples are sized for a CPU test run (they run as shipped in tests/browser/test_examples.py):
sampling at 512×256 (one character: 384×512; the trained character: 256×256) with 8 steps, fusion recorded at
256×256 with 4 steps, training 4 steps on a 128-pixel canvas.
Their notes say, per model loader, what kind of file to pick and where people get it: the file names saved
in the examples are the demo's random-weight models, the test fixtures, which a Registry install does not
have (tests/browser/test_registry_install.py opens the examples there). Example 5 (SDXL) runs here on the
full-size random SDXL (``bash tools/host/make_models.sh --sdxl``; run this tool under the big-model lock); the
browser tier runs the SDXL examples on the test fixture's tiny SDXL instead (their ``tiny`` entry says what it
swaps), and so does this tool for example 7 (``thumbnail_on_tiny``: its fusion does not fit a 23 GiB machine
at full size).

usage: .host/venv/bin/python tools/make_example_workflows.py [--no-thumbnails] [--only 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse

import dev_paths  # isort: split

import demo
from boxes import parse_box_file
from browser import comfy_page, load_workflow
from comfy_server import ComfyServer, error_message
from server_setup import PACKS

REPO = dev_paths.REPO

POSE = demo.POSE.name
WIDTH, HEIGHT, STEPS = 512, 256, 8
FUSION_STEPS, FUSION_SIZE = 4, 256
NEGATIVE = "longbody, lowres, bad anatomy, bad hands, missing fingers, cropped, worst quality, low quality"
GLOBAL_PROMPT = "three people standing near a lake, 4K, high quality, high resolution, best quality"
PROMPTS = {"potter": "a <potter1> <potter2>, in Hogwarts uniform", "hermione": "a <hermione1> <hermione2>, smiling",
           "thanos": "a <thanos1> <thanos2>, in armor"}
THUMBNAIL_SIZE = 512


def _ckpt() -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo.CKPT}}


def _loader(name: str, model, clip, concepts=None, strength: float = 0.7) -> dict:
    inputs = {"model": model, "clip": clip, "edlora_name": f"demo_{name}.pth", "text_encoder_strength": strength,
              "unet_strength": strength}
    if concepts:
        inputs["concepts"] = concepts
    return {"class_type": "MixOfShowLoadEDLoRA", "inputs": inputs}


def _sample(graph: dict, model, positive, negative, regions=None, width=WIDTH, height=HEIGHT, prefix="mixofshow"):
    """Empty latent (22), sampler (23), decode (24), save (25)."""
    graph["22"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    inputs = {"model": model, "positive": positive, "negative": negative, "latent_image": ["22", 0], "seed": 19,
              "steps": STEPS, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
    if regions:
        inputs["regions"] = regions
    graph["23"] = {"class_type": "MixOfShowRegionalSampler" if regions else "KSampler", "inputs": inputs}
    graph["24"] = {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}}
    graph["25"] = {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": prefix}}
    return graph


def _adapter(graph: dict, positive, negative, adapter: str = demo.ADAPTER) -> tuple[list, list]:
    """The OpenPose T2I-Adapter (32, 33) steered by the pose (30)."""
    graph["32"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": adapter}}
    graph["33"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": positive, "negative": negative, "control_net": ["32", 0], "image": ["30", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    return ["33", 0], ["33", 1]


def _chain(graph: dict, strength: float) -> tuple[list, list, list]:
    """Three chained Load ED-LoRA (10, 11, 12) on the checkpoint (1); the last one's outputs."""
    model, clip, concepts = ["1", 0], ["1", 1], None
    for i, name in enumerate(demo.CHARACTERS):
        graph[str(10 + i)] = _loader(name, model, clip, concepts, strength)
        model, clip, concepts = [str(10 + i), 0], [str(10 + i), 1], [str(10 + i), 2]
    return model, clip, concepts


def one_character() -> dict:
    g = {"1": _ckpt(), "10": _loader("potter", ["1", 0], ["1", 1])}
    g["20"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["10", 1], "concepts": ["10", 2], "text":
               "a <potter1> <potter2>, in Hogwarts uniform, standing near a lake, 4K, high quality, best quality"}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 1], "text": NEGATIVE}}
    return _sample(g, ["10", 0], ["20", 0], ["21", 0], width=384, height=512, prefix="mixofshow_one_character")


def _pose_and_prompts(g: dict, clip, concepts) -> None:
    g["30"] = {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": POSE}}
    g["20"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": clip, "concepts": concepts,
                                                               "text": GLOBAL_PROMPT}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": NEGATIVE}}


def pose_regions() -> dict:
    g = {"1": _ckpt()}
    model, clip, concepts = _chain(g, 0.7)
    _pose_and_prompts(g, clip, concepts)
    g["31"] = {"class_type": "MixOfShowPoseRegions", "inputs": {
        "image": ["30", 0], "clip": clip, "concepts": concepts, "margin": 0.05, "control_strength": 1.0,
        "prompts": "\n".join(PROMPTS.values()), "negative": NEGATIVE}}
    positive, negative = _adapter(g, ["20", 0], ["21", 0])
    return _sample(g, model, positive, negative, ["31", 0], prefix="mixofshow_pose_regions")


def reference_boxes() -> list[dict]:
    """The Mix-of-Show authors' boxes for the reference pose (assets/poses/<pose>.txt), one per character."""
    boxes = [b for _, b in parse_box_file(demo.POSE.with_suffix(".txt"))]
    return [{"top": t, "left": left, "bottom": b, "right": r, "prompt": prompt, "negative": NEGATIVE,
             "control_strength": 1.0, "label": "", "color": color}
            for (t, left, b, r), prompt, color in zip(boxes, PROMPTS.values(), ("#e6194b", "#3cb44b", "#4363d8"),
                                                      strict=True)]


def _fused_into_editor(graph: dict, concepts: list, boxes: list[dict]) -> list:
    """Gradient Fusion (40) of ``concepts`` on the checkpoint (1), the pose and prompts with the fused CLIP (20, 21,
    30) and a Regions Editor (31) holding ``boxes`` over the pose; the fused MODEL's link."""
    graph["40"] = {"class_type": "MixOfShowGradientFusion", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": concepts, "steps": FUSION_STEPS, "width": FUSION_SIZE,
        "height": FUSION_SIZE, "seed": 0, "solver": "closed_form", "cache": True}}
    clip, concepts = ["40", 1], ["40", 2]
    _pose_and_prompts(graph, clip, concepts)
    graph["31"] = {"class_type": "MixOfShowRegionsEditor", "inputs": {
        "clip": clip, "concepts": concepts, "image": ["30", 0], "width": 1024, "height": 512,
        "regions_json": json.dumps(boxes)}}
    return ["40", 0]


def fused_regions() -> dict:
    g = {"1": _ckpt()}
    _, _, concepts = _chain(g, 1.0)
    model = _fused_into_editor(g, concepts, reference_boxes())
    positive, negative = _adapter(g, ["20", 0], ["21", 0])
    return _sample(g, model, positive, negative, ["31", 0], prefix="mixofshow_fused_regions")


def _pose_region(graph: dict, person: int, loader: str, text: str, regions: list | None) -> list:
    """Person ``person`` of the pose (30) as a Region (70 + person) with its box mask (50 + person), its prompt
    ``text`` against the shared negative (63) and its loader's MODEL, chained after ``regions``; the new link."""
    box, region = str(50 + person), str(70 + person)
    graph[box] = {"class_type": "MixOfShowPoseBoxMask", "inputs": {"image": ["30", 0], "index": person,
                                                                    "margin": 0.05}}
    inputs = {"positive": [text, 0], "negative": ["63", 0], "mask": [box, 0], "control_strength": 1.0,
              "model": [loader, 0]}
    if regions:
        inputs["regions"] = regions
    graph[region] = {"class_type": "MixOfShowRegion", "inputs": inputs}
    return [region, 0]


def lora_per_region() -> dict:
    """Each character's own Load ED-LoRA from the base checkpoint; each Region gets its chain's MODEL and a
    prompt encoded with its chain's CLIP; the sampler runs the base model."""
    g = {"1": _ckpt(), "30": {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": POSE}}}
    g["63"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}}
    regions = None
    for i, (name, prompt) in enumerate(PROMPTS.items()):
        loader, text = str(10 + i), str(60 + i)
        g[loader] = _loader(name, ["1", 0], ["1", 1])
        g[text] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": [loader, 1], "concepts": [loader, 2],
                                                                   "text": prompt}}
        regions = _pose_region(g, i, loader, text, regions)
    g["20"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": GLOBAL_PROMPT}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}}
    positive, negative = _adapter(g, ["20", 0], ["21", 0])
    return _sample(g, ["1", 0], positive, negative, regions, prefix="mixofshow_lora_per_region")


def sdxl_lora_per_region() -> dict:
    """Example 4 on SDXL with plain LoRAs: each character's LoRA as Concept on the base SDXL checkpoint, named by
    its trigger words; each Region gets its chain's MODEL and a prompt encoded with its chain's CLIP; the pose
    steers an SDXL OpenPose T2I-Adapter."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo.SDXL_CKPT}},
         "30": {"class_type": "MixOfShowLoadReferencePose", "inputs": {"pose": POSE}}}
    g["63"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}}
    regions = None
    for i, (name, words) in enumerate(demo.SDXL_LORAS.items()):
        loader, text = str(10 + i), str(60 + i)
        g[loader] = {"class_type": "MixOfShowLoRAConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": f"demo_sdxl_{name}.safetensors", "trigger_words": words,
            "strength_model": 1.0, "strength_clip": 1.0}}
        g[text] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [loader, 1], "text": SDXL_PROMPTS[i]}}
        regions = _pose_region(g, i, loader, text, regions)
    g["20"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": GLOBAL_PROMPT}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}}
    positive, negative = _adapter(g, ["20", 0], ["21", 0], demo.SDXL_ADAPTER)
    return _sample(g, ["1", 0], positive, negative, regions, prefix="mixofshow_sdxl_lora_per_region")


SDXL_PROMPTS = ("a photo of ohwx wizard, in a school uniform", "a photo of sks witch, smiling",
                "a photo of zxq titan, in armor")


def sdxl_fused_regions() -> dict:
    """Example 3 on SDXL with plain LoRAs: the three LoRAs as Concept chained, Gradient Fusion of the chain on the
    base SDXL, the Regions Editor with the authors' boxes and the SDXL prompts, the fused model sampled under the
    SDXL OpenPose T2I-Adapter."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo.SDXL_CKPT}}}
    model, clip, concepts = ["1", 0], ["1", 1], None
    for i, (name, words) in enumerate(demo.SDXL_LORAS.items()):
        inputs = {"model": model, "clip": clip, "lora_name": f"demo_sdxl_{name}.safetensors", "trigger_words": words,
                  "strength_model": 1.0, "strength_clip": 1.0}
        if concepts:
            inputs["concepts"] = concepts
        g[str(10 + i)] = {"class_type": "MixOfShowLoRAConcept", "inputs": inputs}
        model, clip, concepts = [str(10 + i), 0], [str(10 + i), 1], [str(10 + i), 2]
    # labelled by character (a prompt without concept tokens would be labelled by its first words)
    boxes = [dict(box, prompt=prompt, label=name)
             for box, prompt, name in zip(reference_boxes(), SDXL_PROMPTS, demo.SDXL_LORAS, strict=True)]
    model = _fused_into_editor(g, concepts, boxes)
    positive, negative = _adapter(g, ["20", 0], ["21", 0], demo.SDXL_ADAPTER)
    return _sample(g, model, positive, negative, ["31", 0], prefix="mixofshow_sdxl_fused_regions")


# what the browser tier runs instead of the full-size SDXL (tests/browser/test_examples.py): the fixture pack's
# tiny SDXL for the checkpoint loader, files for it under the same inputs, and 2 sampling steps (a plumbing run:
# 70 transformer blocks with three region LoRAs cost about 10 s a step on 2 CPU cores even at the tiny width)
TINY_SDXL = {"loader": ("1", "TinySDXLLoader", {"unet": "narrow", "seed": 0}),
             "widgets": {**{str(10 + i): {"lora_name": f"tiny_sdxl_{name}.safetensors"}
                            for i, name in enumerate(demo.SDXL_LORAS)},
                         "32": {"control_net_name": "tiny_sdxl_openpose.safetensors"}, "23": {"steps": 2}}}
# example 7 on the tiny SDXL: the same swaps, and Gradient Fusion records 1 step at 64×64 (its text stage encodes
# each concept's layer-wise prompts through both full-width encoders of the tiny SDXL)
TINY_SDXL_FUSED = {"loader": TINY_SDXL["loader"],
                   "widgets": {**TINY_SDXL["widgets"], "40": {"steps": 1, "width": 64, "height": 64}}}


# the page-side swap of a `tiny` entry: the checkpoint loader replaced by `type` with `values`, its links kept, and the
# entry's widget values set
SWAP_TO_TINY = """([loaderId, type, values, widgets]) => {
    const old = app.graph.getNodeById(Number(loaderId));
    const node = LiteGraph.createNode(type);
    node.pos = [...old.pos];
    app.graph.add(node);
    const set = (n, entries) => {
        for (const [name, value] of Object.entries(entries)) n.widgets.find((w) => w.name === name).value = value;
    };
    set(node, values);
    old.outputs.forEach((output, slot) => {
        for (const id of [...(output.links ?? [])]) {
            const link = app.graph.links.get ? app.graph.links.get(id) : app.graph.links[id];
            node.connect(slot, app.graph.getNodeById(link.target_id), link.target_slot);
        }
    });
    app.graph.remove(old);
    for (const [id, entries] of Object.entries(widgets)) set(app.graph.getNodeById(Number(id)), entries);
    return node.outputs.map((o) => (o.links ?? []).length);
}"""


TRAIN_STEPS, TRAIN_SIZE = 4, 128


def train_character() -> dict:
    """A training set from a folder of input/ -> Train ED-LoRA -> Plot Loss Graph and Save ED-LoRA; then the new
    concept's prompt sampled with the trained MODEL."""
    g = {"1": _ckpt()}
    g["2"] = {"class_type": "MixOfShowEDLoRATrainingSet", "inputs": {
        "folder": demo.TRAINING_FOLDER, "templates": "human", "keep_first": 1, "crop_p": 0.5}}
    g["3"] = {"class_type": "MixOfShowTrainEDLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "training_set": ["2", 0],
        "concept_tokens": "<disc1>+<disc2>", "init_tokens": "<rand-0.013>+toy", "preset": "MoS SD1.5 real",
        "steps": TRAIN_STEPS, "seed": 0, "resolution": TRAIN_SIZE, "batch_size": 1, "grad_accum": 1}}
    g["4"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["3", 3], "filename_prefix": "mixofshow_loss"}}
    g["5"] = {"class_type": "MixOfShowSaveEDLoRA", "inputs": {"concepts": ["3", 2], "filename": "trained_character"}}
    g["20"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2], "text":
               "a <disc1> <disc2> on a wooden table, 4K, high quality, best quality"}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": NEGATIVE}}
    return _sample(g, ["3", 0], ["20", 0], ["21", 0], width=256, height=256, prefix="mixofshow_trained_character")


# What each model loader of the examples needs, as the notes tell a user who installed the pack (from the Registry
# or git) and opens an example: the file names saved in the examples are the pack's random-weight test models,
# which are not installed with it. Keyed by node class; the bold name is the node's display name, which
# tests/browser/test_registry_install.py matches against the loaders a fresh install reports missing models for.
LOADER_NOTES = {
    "CheckpointLoaderSimple": (
        "**Load Checkpoint** → an **SD1.5 checkpoint** from `models/checkpoints`: the one your ED-LoRAs were "
        "trained on (Stable Diffusion v1.5 itself, `v1-5-pruned-emaonly.safetensors` from Hugging Face, or an "
        "SD1.5 fine-tune from Civitai)."),
    "MixOfShowLoadEDLoRA": (
        "**Load ED-LoRA** ({count}) → an **ED-LoRA** from `models/edloras` (`.pth` or `.safetensors`): the ones "
        "the Mix-of-Show authors published with their code (TencentARC/Mix-of-Show on GitHub) or your own, trained "
        "with its scripts. For a plain SD1.5 character **LoRA** (`models/loras`, e.g. from Civitai) use **LoRA as "
        "Concept** in its place, named by its trigger words.{tokens}"),
    "ControlNetLoader": (
        "**Load ControlNet Model** → an **OpenPose ControlNet or T2I-Adapter for SD1.5** from `models/controlnet`: "
        "`control_v11p_sd15_openpose` (ControlNet 1.1) or `t2iadapter_openpose_sd14v1` (TencentARC), both on "
        "Hugging Face."),
}
# The same for the SDXL example (its "loaders" entry)
SDXL_LOADER_NOTES = {
    "CheckpointLoaderSimple": (
        "**Load Checkpoint** → an **SDXL checkpoint** from `models/checkpoints`: the one your LoRAs were trained for "
        "(SDXL 1.0 base itself, `sd_xl_base_1.0.safetensors` from Hugging Face, or an SDXL fine-tune such as Pony, "
        "Illustrious or NoobAI from Civitai). SD1.5 files on an SDXL model are refused, naming both."),
    "MixOfShowLoRAConcept": (
        "**LoRA as Concept** ({count}) → an **SDXL character LoRA** from `models/loras` (kohya or diffusers keys, "
        "e.g. from Civitai), its trigger words in the node and in the region's prompt. For a Concept Conductor SDXL "
        "**ED-LoRA** (`models/edloras`) use **Load ED-LoRA** in its place and write its tokens in a Text Encode "
        "with Concepts prompt.{tokens}"),
    "ControlNetLoader": (
        "**Load ControlNet Model** → an **OpenPose ControlNet or T2I-Adapter for SDXL** from `models/controlnet`: "
        "`t2i-adapter-openpose-sdxl-1.0` (TencentARC) or `controlnet-openpose-sdxl-1.0` (thibaud), both on "
        "Hugging Face."),
}
MODELS_NOTE = (
    "**Pick your own models** in the loaders. The file names saved here are the pack's random-weight test models, "
    "which are not installed with the pack: until you pick yours, Run reports each of them as a value that is not "
    "in the list of your files.\n\n"
    "{loaders}\n\n"
    "**Sized for a CPU run** ({cpu}). With real models on a GPU use {real}.")


def _models_note(graph: dict, tokens: str, loaders: dict[str, str]) -> str:
    """One line per kind of model loader in ``graph``, in ``loaders``' order (LOADER_NOTES, SDXL_LOADER_NOTES)."""
    counts = {kind: sum(node["class_type"] == kind for node in graph.values()) for kind in loaders}
    lines = []
    for kind, text in loaders.items():
        if counts[kind]:
            count = "one per character" if counts[kind] > 1 else "one character"
            lines.append("- " + text.format(count=count, tokens=tokens))
    return "\n".join(lines)


def _note(title: str, graph: dict, description: str, tokens: str, cpu: str, real: str,
          loaders: dict[str, str] = LOADER_NOTES) -> str:
    return (f"# {title}\n\n{description}\n\n"
            + MODELS_NOTE.format(loaders=_models_note(graph, tokens, loaders), cpu=cpu, real=real))


_TOKENS_NOTE = " Then write the prompts with their tokens (type `<` in a prompt to pick one)."
_POSE_SIZE = "the pose's size 1024×512 (Empty Latent Image) and 20–30 steps"
_CPU = f"{WIDTH}×{HEIGHT}, {STEPS} steps"


# Each example, by file name (the template browser shows it as the title; its cards are narrow): API
# graph, full title and description (the note on top), columns of nodes (width, node ids top to bottom), groups
# (title, node ids), the nodes that show a region preview after a run (they get room for it: PREVIEW_ROOM, or the
# example's preview_room), the one whose preview is the thumbnail, and the notes on its model loaders when they are
# not LOADER_NOTES ("loaders").
EXAMPLES = {
    "1 - One character (ED-LoRA)": {
        "title": "One character with an ED-LoRA concept prompt",
        "graph": one_character,
        "note": ("Load one ED-LoRA and write its concept tokens in the prompt (`a <potter1> <potter2>, …`): Text "
                 "Encode with Concepts gives each of SD1.5's 16 cross-attention layers its own context. Load ED-LoRA "
                 "shows the file's tokens; typing `<` in the prompt offers them.", _TOKENS_NOTE,
                 f"384×512, {STEPS} steps", "512×768 and 20–30 steps"),
        "columns": [(340, ["1", "10"]), (420, ["20", "21"]), (320, ["22", "23"]), (340, ["24", "25"])],
        "groups": [("1. character", ["1", "10"]), ("2. prompt", ["20", "21"]),
                   ("3. sample", ["22", "23", "24", "25"])],
        "previews": [],
        "thumbnail": "10",
    },
    "2 - Three characters from a pose": {
        "title": "Three characters from a pose (regions + OpenPose adapter)",
        "graph": pose_regions,
        "note": ("Three ED-LoRAs chained into one concept set; **Regions from Pose** finds one region per skeleton "
                 "of the reference pose (left to right) and gives each its line of the prompt; the pose also steers "
                 "the OpenPose T2I-Adapter; the Regional KSampler samples all three at once. After a run, Regions "
                 "from Pose shows its regions over the pose.", _TOKENS_NOTE, _CPU, _POSE_SIZE),
        "columns": [(340, ["1", "10", "11", "12"]), (520, ["30", "31"]), (400, ["20", "21", "32", "33"]),
                    (320, ["22", "23", "24", "25"])],
        "groups": [("1. characters", ["1", "10", "11", "12"]), ("2. regions", ["30", "31"]),
                   ("3. sample", ["20", "21", "32", "33", "22", "23", "24", "25"])],
        "previews": ["31", "23"],
        "thumbnail": "31",
    },
    "3 - Fused ED-LoRAs in regions": {
        "title": "Fuse three ED-LoRAs, then sample the regions",
        "graph": fused_regions,
        "note": ("**Gradient Fusion** merges the three ED-LoRAs into one model (Mix-of-Show's fusion; cached on disk, "
                 "so a re-run with the same files and settings is instant). The **Regions Editor** holds one box per "
                 "character over the pose (the boxes Mix-of-Show's authors used): drag to draw, move or resize, "
                 "`From pose` re-detects them; each box has its own prompt. The Regional KSampler samples the "
                 "fused model.", _TOKENS_NOTE,
                 f"{_CPU}; fusion records {FUSION_STEPS} steps at {FUSION_SIZE}×{FUSION_SIZE}",
                 _POSE_SIZE + ", and let Gradient Fusion record 20 or more steps at 512×512"),
        # Gradient Fusion and the pose in columns of their own, all columns narrow: with five nodes stacked, or
        # wider columns, the example opened (fitted to a full-HD window) below the zoom at which the classic
        # canvas draws text, and its note was an empty box
        "columns": [(320, ["1", "10", "11", "12"]), (300, ["40"]), (280, ["30"]), (460, ["31"]),
                    (320, ["20", "21", "32", "33"]), (300, ["22", "23", "24", "25"])],
        "groups": [("1. characters, fused", ["1", "10", "11", "12", "40"]), ("2. regions", ["30", "31"]),
                   ("3. sample", ["20", "21", "32", "33", "22", "23", "24", "25"])],
        "previews": ["31", "23"],
        # the Regions Editor already shows the pose: less room keeps the example opening (fitted to a full-HD
        # window) at a zoom where the classic canvas draws text, so its note is readable
        "preview_room": 150,
        "thumbnail": "31",
    },
    "4 - A LoRA per region (no fusion)": {
        "title": "Three characters, each LoRA in its own region (no fusion)",
        "graph": lora_per_region,
        "note": ("Each character has its **own** Load ED-LoRA on the base checkpoint (no chain, no fusion). Each "
                 "region's prompt is encoded with its character's CLIP, and its **Region** node gets that character's "
                 "MODEL: the LoRA acts inside the region only, in the same UNet pass. The Regional KSampler runs the "
                 "base model. Boxes: Pose Box to Mask (person 0, 1, 2 of the pose, left to right).", _TOKENS_NOTE,
                 _CPU, _POSE_SIZE),
        "columns": [(340, ["1", "10", "11", "12"]), (300, ["30", "50", "51", "52"]), (340, ["60", "61", "62", "63"]),
                    (300, ["70", "71", "72"]), (360, ["20", "21", "32", "33"]), (320, ["22", "23", "24", "25"])],
        "groups": [("1. characters", ["1", "10", "11", "12"]),
                   ("2. regions", ["30", "50", "51", "52", "60", "61", "62", "63", "70", "71", "72"]),
                   ("3. sample", ["20", "21", "32", "33", "22", "23", "24", "25"])],
        "previews": ["23"],
        "thumbnail": "23",
    },
    "5 - Three SDXL characters from a pose (a LoRA per region)": {
        "title": "Three SDXL characters from a pose, each LoRA in its own region",
        "graph": sdxl_lora_per_region,
        "note": ("Example 4 on **SDXL**, with plain character LoRAs: each **LoRA as Concept** loads one character's "
                 "SDXL LoRA on the base checkpoint (named by its trigger words, which the region's prompt uses); "
                 "each **Region** gets that character's MODEL and a prompt encoded with its CLIP, so each LoRA acts "
                 "inside its region only, all in one UNet pass (Pose Box to Mask: person 0, 1, 2 of the pose, left to "
                 "right). The pose also steers an SDXL OpenPose T2I-Adapter. SDXL's global vector (pooled text and "
                 "size) is the global prompt's.", "", _CPU,
                 "the pose's 2:1 at SDXL's size, 1536×768 (Empty Latent Image), and 25–30 steps"),
        "loaders": SDXL_LOADER_NOTES,
        "columns": [(360, ["1", "10", "11", "12"]), (300, ["30", "50", "51", "52"]), (340, ["60", "61", "62", "63"]),
                    (300, ["70", "71", "72"]), (360, ["20", "21", "32", "33"]), (320, ["22", "23", "24", "25"])],
        "groups": [("1. characters (SDXL LoRAs)", ["1", "10", "11", "12"]),
                   ("2. regions", ["30", "50", "51", "52", "60", "61", "62", "63", "70", "71", "72"]),
                   ("3. sample", ["20", "21", "32", "33", "22", "23", "24", "25"])],
        "previews": ["23"],
        "thumbnail": "23",
        "tiny": TINY_SDXL,
    },
    "6 - Train a character (ED-LoRA)": {
        "title": "Train a character (ED-LoRA), then sample it",
        "graph": train_character,
        "note": ("**ED-LoRA Training Set** reads a folder of `input/` laid out as Mix-of-Show's datasets (`image/`, "
                 "`mask/<name>.png`, `caption/<name>.txt` with `<TOK>` where the character goes); or connect IMAGE "
                 "and MASK batches. **Train ED-LoRA** trains new tokens (one embedding per cross-attention layer), a "
                 "text-encoder and a UNet LoRA with the MoS SD1.5 real preset; its outputs are what Load ED-LoRA "
                 "gives, so the prompt below uses the new tokens at once (and they could go to regions or Gradient "
                 "Fusion). Plot Loss Graph draws the loss; **Save ED-LoRA** writes `models/edloras/"
                 "trained_character.safetensors`.\n\n**Your character:** put 5–20 pictures with masks and captions "
                 "in a folder of `input/` (the demo's, `mixofshow_example_character`, holds a synthetic red disc), "
                 "pick it, name the tokens and a one-token class word (`<rand-0.013>+girl`).",
                 "",
                 f"{TRAIN_STEPS} training steps on a {TRAIN_SIZE}-pixel canvas, one image per step; sampling 256×256, "
                 f"{STEPS} steps",
                 "steps 0 (the preset's: images × 500 / 4), resolution 0 (512), batch_size and grad_accum 0 (2 × 2) "
                 "— a few thousand steps, minutes to tens of minutes on one GPU — and sample at 512×512 with 20–30 "
                 "steps"),
        "columns": [(340, ["1", "2"]), (420, ["3"]), (420, ["4", "5"]), (420, ["20", "21"]),
                    (320, ["22", "23", "24", "25"])],
        "groups": [("1. training set", ["1", "2"]), ("2. train", ["3", "4", "5"]),
                   ("3. sample the new concept", ["20", "21", "22", "23", "24", "25"])],
        "previews": [],
        "thumbnail": "4",   # the loss graph (Plot Loss Graph's preview)
    },
    "7 - SDXL characters fused, then in regions": {
        "title": "Fuse three SDXL characters into one model, then sample the regions",
        "graph": sdxl_fused_regions,
        "note": ("Example 3 on **SDXL**, with plain character LoRAs: three **LoRA as Concept** chained into one "
                 "concept set (each named by its trigger words), then **Gradient Fusion** merges them into one SDXL "
                 "model and both text encoders (cached on disk; **Save Fused ED-LoRA Bundle** would write it as one "
                 "SDXL LoRA that the stock Load LoRA applies). The **Regions Editor** holds one box per character "
                 "over the pose, each with its trigger words in its prompt; the pose also steers an SDXL OpenPose "
                 "T2I-Adapter, and the Regional KSampler samples the fused model.", "",
                 f"{_CPU}; fusion records {FUSION_STEPS} steps at {FUSION_SIZE}×{FUSION_SIZE}",
                 "the pose's 2:1 at SDXL's size, 1536×768 (Empty Latent Image), 25–30 steps, and let Gradient Fusion "
                 "record 20 or more steps at 1024×1024"),
        "loaders": SDXL_LOADER_NOTES,
        "columns": [(320, ["1", "10", "11", "12"]), (300, ["40"]), (280, ["30"]), (460, ["31"]),
                    (320, ["20", "21", "32", "33"]), (300, ["22", "23", "24", "25"])],
        "groups": [("1. characters (SDXL LoRAs), fused", ["1", "10", "11", "12", "40"]), ("2. regions", ["30", "31"]),
                   ("3. sample", ["20", "21", "32", "33", "22", "23", "24", "25"])],
        "previews": ["31", "23"],
        "preview_room": 150,  # as example 3: the note stays readable when the example opens fitted to the screen
        "thumbnail": "31",
        "tiny": TINY_SDXL_FUSED,
        # its thumbnail run is on the tiny SDXL too: on the full-size random SDXL, recording a whole-block LoRA patches
        # 2.2 G UNet weights (8.2 GiB of float32 copies) beside the 12 GiB model, ~22 GiB at the peak by
        # bench_fusion.py --sdxl's attention-only figure, more than a 23 GiB machine can give (the thumbnail is
        # the Regions Editor's preview over the pose, the same picture on either model)
        "thumbnail_on_tiny": True,
    },
}

GROUP_COLORS = ("#3f5f7f", "#7f5f3f", "#3f7f5f")
PREVIEW_ROOM = 280  # px under a node's widgets for the region preview it shows after a run
SCREEN = (1920, 1080)  # the workflow opens fitted to a full-HD window

_BUILD_UI_GRAPH = """async ([graph, name, columns, groups, note, previewIds, colors, previewRoom, screen]) => {
    await app.loadApiJson(graph, name);
    const gap = 40, top = 330, titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
    let x = 40;
    for (const [width, ids] of columns) {
        let y = top;
        for (const id of ids) {
            const node = app.graph.getNodeById(Number(id));
            const [minWidth, minHeight] = node.computeSize();
            const room = previewIds.includes(id) ? previewRoom : 0;
            node.setSize([Math.max(width, minWidth), Math.max(node.size[1], minHeight) + room]);
            node.pos = [x, y];
            y += node.size[1] + titleHeight + gap;
        }
        x += width + gap * 2;
    }
    const about = LiteGraph.createNode("MarkdownNote");
    about.title = "About this workflow";
    about.widgets[0].value = note;
    about.pos = [40, 60];
    about.size = [Math.min(x - 120, 1400), 200];
    app.graph.add(about);
    const pad = 12, head = 40;
    groups.forEach(([label, ids], i) => {
        const nodes = ids.map((id) => app.graph.getNodeById(Number(id)));
        const x0 = Math.min(...nodes.map((n) => n.pos[0])) - pad;
        const y0 = Math.min(...nodes.map((n) => n.pos[1] - titleHeight)) - head;
        const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + pad;
        const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + pad;
        const group = new LiteGraph.LGraphGroup(label);
        group.color = colors[i % colors.length];
        group.pos = [x0, y0];
        group.size = [x1 - x0, y1 - y0];
        app.graph.add(group);
    });
    // open fitted to the screen, everything in view
    const xs = app.graph.nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
    const ys = app.graph.nodes.flatMap((n) => [n.pos[1] - titleHeight, n.pos[1] + n.size[1]]);
    const [x0, y0] = [Math.min(...xs), Math.min(...ys)];
    const scale = Math.min(1, (screen[0] - 140) / (Math.max(...xs) - x0), (screen[1] - 170) / (Math.max(...ys) - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [80 / scale - x0, 110 / scale - y0];
    for (const node of app.graph.nodes) {  // examples reproduce: fixed seeds
        for (const widget of node.widgets ?? []) if (widget.name === "control_after_generate") widget.value = "fixed";
    }
    return JSON.stringify(app.graph.serialize());  // JSON: `undefined` fields would fail the workflow schema
}"""


def build_ui_workflow(page, name: str, example: dict) -> dict:
    """The example in the UI's format: loaded from its API graph, laid out, grouped, annotated."""
    graph = example["graph"]()
    note = _note(example["title"], graph, *example["note"], loaders=example.get("loaders", LOADER_NOTES))
    return json.loads(page.evaluate(_BUILD_UI_GRAPH, [graph, name, example["columns"], example["groups"],
                                                      note, example["previews"], GROUP_COLORS,
                                                      example.get("preview_room", PREVIEW_ROOM), SCREEN]))


def swap_to_tiny(page, tiny: dict) -> list[int]:
    """Swap the loaded example onto the tiny SDXL in the page (its ``tiny`` entry); the new loader's link count per
    output."""
    loader_id, node_type, values = tiny["loader"]
    return page.evaluate(SWAP_TO_TINY, [loader_id, node_type, values, tiny["widgets"]])


def run_in_ui(page, server: ComfyServer, workflow: dict, timeout: float = 3600, tiny: dict | None = None) -> dict:
    """Open the workflow in the UI (with ``tiny``: swapped onto the tiny SDXL in the page), queue it like the Run
    button; its finished /history entry."""
    before = set(server.get("/history"))
    load_workflow(page, workflow)
    if tiny is not None:
        swap_to_tiny(page, tiny)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") is not None]
        if done:
            return done[0]
        time.sleep(1)
    raise TimeoutError("the example did not finish")


def _view(server: ComfyServer, ref: dict):
    from PIL import Image

    query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                    "type": ref["type"]})
    return Image.open(io.BytesIO(server.get_bytes(f"/view?{query}"))).convert("RGB")


def thumbnail(server: ComfyServer, entry: dict, node_id: str) -> bytes:
    """A square JPEG of the node's preview (a region preview; the training example's loss graph; for the
    one-character example, which has no regions, the tokens Load ED-LoRA reported, drawn as a region), letterboxed
    on dark grey."""
    import numpy as np
    from PIL import Image

    from fusion.regions.preview import draw_regions

    shown = entry["outputs"][node_id]
    if "images" in shown:
        picture = _view(server, shown["images"][0])
    else:
        mask = np.zeros((512, 384), np.float32)
        mask[24:488, 24:360] = 1.0
        picture = Image.fromarray(draw_regions([mask], [shown["text"][0]]))
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    square = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (32, 32, 32))
    square.paste(picture, ((THUMBNAIL_SIZE - picture.width) // 2, (THUMBNAIL_SIZE - picture.height) // 2))
    out = io.BytesIO()
    square.save(out, "JPEG", quality=88)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-thumbnails", action="store_true", help="only write the JSON (no runs)")
    ap.add_argument("--only", default="", help="only the examples whose file name starts with this (e.g. 3)")
    args = ap.parse_args()
    base = REPO / ".host" / "examples-base"
    demo.prepare(base)
    if not args.no_thumbnails and any(e.get("thumbnail_on_tiny") for n, e in EXAMPLES.items()
                                      if n.startswith(args.only)):
        # the tiny SDXL's files, for the examples whose thumbnail run is on it
        subprocess.run([sys.executable, str(REPO / "tests" / "support" / "tiny_sdxl_files.py"),
                        str(base / "models")], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    out_dir = REPO / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    failed = []
    with ComfyServer(base, PACKS) as server, comfy_page(server.url) as (page, errors):
        # window.app is set once every extension's setup() has run; app.extensions lists the registered ones
        page.wait_for_function("() => (window.app?.extensions ?? []).some((e) => e.name === 'mixofshow.concepts')",
                               timeout=60000)
        for name, example in EXAMPLES.items():
            if not name.startswith(args.only):
                continue
            ui = build_ui_workflow(page, name, example)
            (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print("wrote", out_dir / f"{name}.json", len(ui["nodes"]), "nodes", flush=True)
            if args.no_thumbnails:
                continue
            t0 = time.time()
            entry = run_in_ui(page, server, ui, tiny=example["tiny"] if example.get("thumbnail_on_tiny") else None)
            print(f"  ran in {time.time() - t0:.0f} s: {entry['status']['status_str']} {error_message(entry)}",
                  flush=True)
            if example["thumbnail"] not in entry.get("outputs", {}):
                failed.append(name)
                continue
            (out_dir / f"{name}.jpg").write_bytes(thumbnail(server, entry, example["thumbnail"]))
            print("wrote", out_dir / f"{name}.jpg", flush=True)
        if errors:
            print("page errors:", errors)
            return 1
    if failed:
        print("no region preview (the run failed) for:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
