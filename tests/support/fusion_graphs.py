"""The API-format fusion prompt several tiers run (in-process, HTTP, browser): the fixture pack's tiny
"narrow" SD1.5 (node 1), two chained Load ED-LoRA at strength 1.0 (2, 3), Gradient Fusion of both on the
base model (4) with 0.1.0's inputs, Save Fused ED-LoRA Bundle (5)."""
from __future__ import annotations


def fusion_and_save(edloras: tuple[str, str], steps: int, size: int, prefix: str, **new_inputs) -> dict:
    """Nodes 1-5 as above; ``new_inputs`` are added to the fusion node's (inputs added after 0.1.0)."""
    return {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "edlora_name": edloras[0], "text_encoder_strength": 1.0,
                                                              "unet_strength": 1.0}},
        "3": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                              "edlora_name": edloras[1], "text_encoder_strength": 1.0,
                                                              "unet_strength": 1.0, "concepts": ["2", 2]}},
        "4": {"class_type": "MixOfShowGradientFusion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 2], "steps": steps, "width": size, "height": size,
            "seed": 0, "solver": "closed_form", "cache": False, **new_inputs}},
        "5": {"class_type": "MixOfShowSaveFusedBundle", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                   "concepts": ["4", 2], "filename_prefix": prefix}},
    }
