"""The ComfyUI test harness itself: executor arguments a newer ComfyUI expects, skipping (not
crashing) the ComfyUI tiers when ``$MIXOFSHOW_COMFYUI`` names no ComfyUI, and the test server helper
cleaning up after a server that exits at once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import comfy_env
import pytest

REPO = Path(__file__).resolve().parents[2]


class ExecutorOfANewerComfyUI:
    """Reads a cache argument 0.3.75's executor does not have, as releases after it read ``ram_inactive``."""

    def __init__(self, server, cache_type=None, cache_args=None):
        self.server, self.cache_type = server, cache_type
        self.inactive_headroom = cache_args["ram_inactive"]
        self.lru = cache_args.get("lru", 8)


def test_harness_fills_every_cache_argument_the_executor_reads():
    execution = SimpleNamespace(PromptExecutor=ExecutorOfANewerComfyUI, CacheType=SimpleNamespace(CLASSIC="classic"))
    with pytest.raises(KeyError, match="ram_inactive"):  # what a hard-coded argument set does
        ExecutorOfANewerComfyUI(None, cache_args={"lru": 0, "ram": 0})
    server = object()
    executor = comfy_env.new_executor(execution, server)
    assert executor.server is server and executor.cache_type == "classic"
    assert executor.inactive_headroom == 0 and executor.lru == 0
    assert {"ram_inactive", "lru"} <= set(comfy_env.cache_args_for(ExecutorOfANewerComfyUI))


@pytest.mark.parametrize("test_file", ["tests/inprocess/test_graphs.py", "tests/api/test_server.py"])
def test_comfyui_tiers_skip_with_the_reason_when_there_is_no_comfyui(test_file):
    env = dict(os.environ, MIXOFSHOW_COMFYUI="/nonexistent")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test_file],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "1 skipped" in output and "no ComfyUI at /nonexistent" in output, output


def test_server_helper_closes_its_log_when_the_server_exits_early(tmp_path, monkeypatch):
    """A "python" that exits at once stands for a ComfyUI that dies while starting: the helper says so, and
    leaves no log handle open and no process unreaped."""
    from comfy_server import ComfyServer

    monkeypatch.setenv("MIXOFSHOW_COMFYUI", str(tmp_path))
    server = ComfyServer(tmp_path / "base", {}, python="/bin/false")
    with pytest.raises(RuntimeError, match="ComfyUI exited early; see .*server.log"):
        server.__enter__()
    assert server.log is None
    assert server.proc is not None and server.proc.returncode is not None
