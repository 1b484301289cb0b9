"""What the tiers that talk to a real ComfyUI server share: the packs it loads (this pack and the test
fixture pack with the tiny models), the tiny ED-LoRA files its prompts load, and reading back what a
prompt did (its saved images, the nodes it took from ComfyUI's cache, its error, the server's memory)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from comfy_server import ComfyServer
from PIL import Image
from synthetic import make_edlora_state

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "support" / "mixofshow_test_fixtures"
PACKS = {"mixofshow": REPO, "mixofshow_test_fixtures": FIXTURES}
# make_edlora_state's sizes for the fixture pack's tiny CLIP (2 layers, 512 wide MLP) and its
# 32-channel ("narrow", "mini") or 64-channel ("wide") UNet
TINY_TEXT = dict(text_layers=2, text_intermediate=512)


def write_tiny_edlora(path: Path, tokens: tuple[str, ...], seed: int, model_channels: int = 32) -> Path:
    torch.save(make_edlora_state(tokens, seed=seed, model_channels=model_channels, **TINY_TEXT), path)
    return path


def pack_server(base: Path) -> ComfyServer:
    """A ComfyUI server (not started: use it as a context manager) with both packs, on ``base``."""
    # the fusion cache in the server's own models folder, whatever this process's environment says
    return ComfyServer(base, PACKS, env={"MIXOFSHOW_FUSION_CACHE": str(base / "models" / "edloras" / ".fusion_cache")})


def saved_pixels(server: ComfyServer, entry: dict, node_id: str) -> np.ndarray:
    """The one image SaveImage node ``node_id`` wrote in the prompt of ``entry`` (its /history
    entry), as an RGB array read from the server's output folder."""
    (image,) = entry["outputs"][node_id]["images"]
    with Image.open(server.base / "output" / image.get("subfolder", "") / image["filename"]) as im:
        return np.asarray(im.convert("RGB"))


def cached_nodes(entry: dict) -> set[str]:
    """The nodes of the prompt whose outputs ComfyUI took from its cache instead of running them."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_cached":
            return {str(n) for n in data.get("nodes", [])}
    return set()


def event_data(entry: dict, event: str) -> dict | None:
    """The data of the prompt's first status message of kind ``event`` (e.g. execution_interrupted)."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == event:
            return data
    return None


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
