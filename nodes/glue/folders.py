"""The pack's models folder (``models/edloras``, plus ``edloras:`` paths of extra_model_paths.yaml), the
files the loaders list, and where saved files go."""
from __future__ import annotations

import os

import folder_paths

from ...fusion.files.edlora import output_stem
from ..names import EDLORA_EXTENSIONS, EDLORA_FOLDER


def register_model_folder() -> None:
    """``models/edloras`` (plus any paths users set in extra_model_paths.yaml under ``edloras``)."""
    default = os.path.join(folder_paths.models_dir, EDLORA_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(EDLORA_FOLDER, ([], set()))
    if default not in paths:
        paths = list(paths) + [default]
    folder_paths.folder_names_and_paths[EDLORA_FOLDER] = (paths, set(exts) | EDLORA_EXTENSIONS)


def edlora_choices() -> list[str]:
    """ED-LoRA files from models/edloras, then .pth/.safetensors from models/loras (prefixed ``loras/``)."""
    names = list(folder_paths.get_filename_list(EDLORA_FOLDER))
    names += ["loras/" + n for n in folder_paths.get_filename_list("loras")
              if os.path.splitext(n)[1].lower() in EDLORA_EXTENSIONS]
    return names


def edlora_path(name: str) -> str:
    if name.startswith("loras/") and folder_paths.get_full_path(EDLORA_FOLDER, name) is None:
        return folder_paths.get_full_path_or_raise("loras", name[len("loras/"):])
    return folder_paths.get_full_path_or_raise(EDLORA_FOLDER, name)


def bundle_output_path(prefix: str, where: str) -> str:
    """``<prefix>_<00001>.safetensors`` (the first free number) in models/edloras; a prefix no file system
    takes is refused naming ``where`` (the node and input) before anything is written."""
    stem = output_stem(prefix.strip() or "fused_edlora", where)
    folder = folder_paths.get_folder_paths(EDLORA_FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    counter = 1
    while True:
        path = os.path.join(folder, f"{stem}_{counter:05d}.safetensors")
        if not os.path.exists(path):
            return path
        counter += 1
