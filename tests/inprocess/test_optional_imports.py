"""OpenCV is imported only where a preview is drawn or a pose image searched: a ComfyUI without it loads every
node family of the pack, and the nodes that need it say which package to install."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SUPPORT = Path(__file__).resolve().parents[1] / "support"
REPO = Path(__file__).resolve().parents[2]


def test_every_node_family_loads_without_opencv(env):
    with_opencv = sum(1 for k in env.nodes.NODE_CLASS_MAPPINGS if k.startswith("MixOfShow"))
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoOpenCV(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "cv2" or name.startswith("cv2."):
                    raise ModuleNotFoundError("No module named 'cv2'", name="cv2")
        sys.meta_path.insert(0, NoOpenCV())
        sys.path[:0] = [{str(SUPPORT)!r}, {str(REPO)!r}, {str(REPO / "tools" / "host")!r}, {str(REPO / "tools")!r}]
        import comfy_env
        e = comfy_env.env()
        ids = sorted(k for k in e.nodes.NODE_CLASS_MAPPINGS if k.startswith("MixOfShow"))
        print("NODES", len(ids))
        import torch
        try:
            comfy_env.node("MixOfShowPoseBoxMask", image=torch.zeros(1, 64, 64, 3), index=0, margin=0.05)
        except ImportError as err:
            print("ERROR", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert with_opencv >= 18 and f"NODES {with_opencv}" in out, out + done.stderr[-3000:]
    assert "ERROR Mix-of-Show: finding people in a pose image needs OpenCV" in out and "opencv-python-headless" in out
