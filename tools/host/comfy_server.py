"""Start/stop a real ComfyUI server on 127.0.0.1 and talk to its HTTP API (tests and the demo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def comfy_root() -> Path:
    """The ComfyUI every tier, the demo and the benchmarks run: ``$MIXOFSHOW_COMFYUI`` (your own
    checkout) or the project's host in ``.host/ComfyUI``."""
    return Path(os.environ.get("MIXOFSHOW_COMFYUI") or REPO / ".host" / "ComfyUI").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` with ``--base-directory BASE``; the pack (and any extra packs) linked into
    ``BASE/custom_nodes``; ``front_end_root``: serve that frontend (a ``comfyui_frontend_package/static``
    folder) instead of the bundled one. Use as a context manager. ``python`` defaults to this interpreter
    (the host's venv, or the environment of the ComfyUI that ``$MIXOFSHOW_COMFYUI`` names)."""

    def __init__(self, base: Path, packs: dict[str, Path], python: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, front_end_root: Path | None = None):
        self.base, self.packs = Path(base), packs
        self.env = dict(env or {})  # added to this process's environment for the server
        self.front_end_root = front_end_root
        self.python = python or sys.executable
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self) -> "ComfyServer":
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
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError("ComfyUI did not come up within 180 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def post(self, path: str, obj) -> tuple[int, dict]:
        """POST JSON; returns (status, the JSON answer, {} for the endpoints that answer with an empty body
        such as /interrupt and /queue)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(obj).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Queue a prompt, wait for it, return its /history entry (raises on HTTP 400)."""
        status, r = self.post("/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph: {json.dumps(r)[:2000]}")
        pid = r["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                return h[pid]
            time.sleep(0.25)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout} s")


def error_message(entry: dict) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
