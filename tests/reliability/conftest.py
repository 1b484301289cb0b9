"""The reliability tier: ONE real ComfyUI server on 127.0.0.1 (the pack and the test fixture pack, tiny
models only) takes a soak of mixed prompts with bad inputs among them, interrupts in the middle of a
fusion and of a regional sampling, and a stock prompt before and after all of it.

The server's first prompts, before any test runs, are the references: the stock prompt's image and
what is attached to the tiny model's modules and patchers (the fixture pack's ModelStateProbe).

Figures: the tests put theirs into ``tier.figures``; at the end of the session they are printed and
written to ``.reliability/last_run.json`` (git-ignored), with the command, the date and the host, for
``tools/write_reliability_doc.py`` to render docs/reliability.md from.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import comfy_env
import numpy as np
import pytest
import reliability_graphs as rg
from comfy_server import ComfyServer, error_message
from host_tier import module_without_host
from lora_files import lora_factors, write_diffusers_lora, write_kohya_lora
from server_setup import REPO, pack_server, saved_pixels, write_tiny_edlora

MISSING_HOST = comfy_env.missing_host_reason()
SUMMARY = REPO / ".reliability" / "last_run.json"
DOC = REPO / "docs" / "reliability.md"  # rendered from SUMMARY: a change there is no change to what ran
PROMPT_TIMEOUT = 120  # seconds for any one prompt of the tier (each takes a few on 2 CPU cores)
FIGURES: dict = {}
_CLOCK: dict = {}  # monotonic start of the tier (server start) and end of its last test


def pytest_pycollect_makemodule(module_path, parent):
    if MISSING_HOST:
        return module_without_host(module_path, parent, MISSING_HOST)
    return None


@dataclass
class Tier:
    server: ComfyServer
    stock_before: np.ndarray | None = None  # the stock prompt's image before any other prompt
    state_before: dict | None = None  # ModelStateProbe's report before any other prompt
    figures: dict = field(default_factory=lambda: FIGURES)

    def run(self, graph: dict) -> dict:
        """Queue a prompt and wait (at most PROMPT_TIMEOUT) until it has finished; its /history entry."""
        return self.server.run(graph, timeout=PROMPT_TIMEOUT)

    def run_ok(self, graph: dict) -> dict:
        """Run a prompt that must succeed; its /history entry."""
        entry = self.run(graph)
        assert entry["status"]["status_str"] == "success", error_message(entry)
        return entry

    def image(self, prompt: rg.Prompt) -> tuple[dict, np.ndarray]:
        entry = self.run_ok(prompt.graph)
        return entry, saved_pixels(self.server, entry, prompt.save)

    def model_state(self) -> dict:
        entry = self.run_ok(rg.model_state_probe())
        (report,) = [out["model_state"][0] for out in entry["outputs"].values() if "model_state" in out]
        return report

    @property
    def fusion_cache(self) -> Path:
        return self.server.base / "models" / "edloras" / ".fusion_cache"


def write_files(base: Path) -> None:
    """The ED-LoRAs, LoRAs, corrupt file and pose image that reliability_graphs' prompts load."""
    edloras, loras = base / "models" / "edloras", base / "models" / "loras"
    edloras.mkdir(parents=True)
    loras.mkdir(parents=True)
    for i, (name, tokens) in enumerate(rg.EDLORAS.items()):
        write_tiny_edlora(edloras / name, tokens, seed=500 + i)
    whole = (edloras / "rel_a.pth").read_bytes()
    (edloras / rg.CORRUPT_EDLORA).write_bytes(whole[:len(whole) // 2])
    man, woman = rg.LORAS
    write_kohya_lora(loras / man, lora_factors(600, scale=0.7))
    write_diffusers_lora(loras / woman, lora_factors(601, scale=0.7))
    (base / "input").mkdir()
    shutil.copy(REPO / "assets" / "poses" / rg.POSE_IMAGE, base / "input" / rg.POSE_IMAGE)


@pytest.fixture(scope="session")
def tier(tmp_path_factory) -> Tier:
    _CLOCK["start"] = time.monotonic()
    base = tmp_path_factory.mktemp("reliability-base")
    write_files(base)
    with pack_server(base) as server:
        FIGURES["server_start_seconds"] = round(time.monotonic() - _CLOCK["start"], 1)
        t = Tier(server)
        _, t.stock_before = t.image(rg.stock(seed=1))
        t.state_before = t.model_state()
        yield t


# --------------------------------------------------------------------------- figures


def pytest_runtest_logreport(report):
    if "start" in _CLOCK:
        _CLOCK["end"] = time.monotonic()


def _command(args: tuple[str, ...]) -> str:
    """The command line of the run as the user typed it (tools/test.sh adds ``-q -p no:cacheprovider``)."""
    args = list(args)
    if args[:3] == ["-q", "-p", "no:cacheprovider"]:
        return "bash tools/test.sh " + shlex.join(args[3:])
    return "python -m pytest " + shlex.join(args)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def pytest_sessionfinish(session, exitstatus):
    if "start" not in _CLOCK:
        return  # no test of this tier ran
    import torch

    FIGURES["tier_seconds"] = round(_CLOCK.get("end", time.monotonic()) - _CLOCK["start"], 1)
    summary = {
        "command": _command(session.config.invocation_params.args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exit_status": int(exitstatus),
        "tests": {"collected": session.testscollected, "failed": session.testsfailed},
        "commit": _git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if _git(
            "status", "--porcelain", "--", ".", f":!{DOC.relative_to(REPO)}") else ""),
        "host": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                 "torch": torch.__version__, "comfyui": _comfyui_version(), "machine": platform.machine()},
        "figures": FIGURES,
    }
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")


def _comfyui_version() -> str:
    text = (comfy_env.comfy_root() / "comfyui_version.py").read_text()
    return text.split("__version__ = ")[-1].strip().strip('"')


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability figures")
    soak = FIGURES.get("soak")
    if soak:
        write(f"prompts held {soak['prompts_held']}/{soak['prompts']}, faults survived {soak['faults_survived']}/"
              f"{len(soak['faults'])}, repeats pixel-equal {soak['repeats_equal']}/{soak['repeats']}")
        write(f"server RSS after prompt 5: {soak['rss_mib_after_5th']:.1f} MiB, after prompt {soak['prompts']}: "
              f"{soak['rss_mib_after_last']:.1f} MiB ({soak['rss_change_percent']:+.1f} %)")
        write(f"soak {soak['seconds']:.1f} s")
    for name, cancel in FIGURES.get("cancel", {}).items():
        stage = f" (\"{cancel['stage']}\")" if cancel.get("stage") else ""
        write(f"cancel during {name}: /interrupt at step {cancel['step']}/{cancel['steps']}{stage} of "
              f"{cancel['interrupted_node']}, stopped after step {cancel['last_step']}, "
              f"{1000 * cancel['seconds_to_stop']:.0f} ms after /interrupt; hooks left {cancel['hooks_left']}, "
              f"next prompt pixel-equal: {cancel['next_prompt_equal']}")
    clean = FIGURES.get("clean_models")
    if clean:
        write(f"stock prompt after the tier equals before: {clean['stock_equal']}")
    write(f"tier {FIGURES.get('tier_seconds', '?')} s (server start {FIGURES.get('server_start_seconds')} s); "
          f"written to {SUMMARY.relative_to(REPO)}")
