"""Start/stop a real ComfyUI server on 127.0.0.1 for the tests, the demo and the tools. Its HTTP client is
the headless runner's (:class:`mixofshow_run.Server`, the one client of the project); this module adds the
server process and the few requests only the tests make."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mixofshow_run

REPO = Path(__file__).resolve().parents[2]


def comfy_root() -> Path:
    """The ComfyUI every tier, the demo and the benchmarks run: ``$MIXOFSHOW_COMFYUI`` (your own
    checkout) or the project's host in ``.host/ComfyUI``."""
    return Path(os.environ.get("MIXOFSHOW_COMFYUI") or REPO / ".host" / "ComfyUI").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(line: str) -> None:
    """The runner's log, for prompts the tests queue (they print nothing)."""


class ComfyServer(mixofshow_run.Server):
    """``main.py --cpu`` with ``--base-directory BASE``; the pack (and any extra packs) linked into
    ``BASE/custom_nodes``; ``front_end_root``: serve that frontend (a ``comfyui_frontend_package/static``
    folder) instead of the bundled one. Use as a context manager. ``python`` defaults to this interpreter
    (the host's venv, or the environment of the ComfyUI that ``$MIXOFSHOW_COMFYUI`` names).

    Requests: the runner's ``get_json``, ``get_bytes`` and ``post_json`` (``(status, JSON)``, error statuses
    included), plus :meth:`get`, :meth:`get_status` and :meth:`run`."""

    def __init__(self, base: Path, packs: dict[str, Path], python: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, front_end_root: Path | None = None):
        self.base, self.packs = Path(base), packs
        self.env = dict(env or {})  # added to this process's environment for the server
        self.front_end_root = front_end_root
        self.python = python or sys.executable
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.proc = None
        self.log = None

    def __enter__(self) -> ComfyServer:
        for sub in ("custom_nodes", "models/checkpoints", "models/edloras", "models/controlnet", "input", "output",
                    "user/default", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # skip the first-run templates dialog in the web UI
            settings.write_text('{"Comfy.TutorialCompleted": true}')
        for name, path in self.packs.items():
            link, target = self.base / "custom_nodes" / name, Path(path).resolve()
            if link.is_symlink() and link.resolve() != target:  # a kept base folder made from another checkout
                link.unlink()
            if not link.exists():
                link.symlink_to(target)
        self.log = open(self.base / "server.log", "ab")
        try:
            self._start()
        except BaseException:  # no server left running, no log file left open
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **self.env)
        self.proc = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base),
             "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]
            + (["--front-end-root", str(self.front_end_root)] if self.front_end_root else []),
            cwd=comfy_root(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early; see {self.base / 'server.log'}")
            try:
                self.get_json("/system_stats")
                return
            except (mixofshow_run.RunError, OSError):
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not come up within 180 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def get(self, path: str):
        """GET: the JSON answer, or the text of any other (a script, a help page); RunError on an error status."""
        body = self.get_bytes(path)
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def get_status(self, path: str) -> tuple[int, dict]:
        """GET a route that may refuse: (status, the JSON answer), error statuses included."""
        return self._answer(self.url + path)

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Queue a prompt, wait for it, return its /history entry (mixofshow_run.Refused when refused)."""
        pid = mixofshow_run._queue(self, graph, str(uuid.uuid4()), _quiet)
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = mixofshow_run._finished_entry(self, pid)
            if entry is not None:
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout} s")


def error_message(entry: dict) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
