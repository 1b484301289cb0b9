"""The README's main job (tools/demo.sh → tools/demo.py): its graph runs through the headless runner on
the demo models, and the picture it reports and copies to .host/demo.png is the sampled one, not one of
the region previews the prompt also outputs."""
from pathlib import Path

import demo
import pytest
from comfy_server import ComfyServer
from PIL import Image

import mixofshow_run

REPO = Path(__file__).resolve().parents[2]

DEMO_MODELS = [REPO / ".host" / "models" / name for name in (demo.CKPT, demo.ADAPTER)]


def test_the_demo_reports_its_sampled_image(tmp_path):
    missing = [str(p) for p in DEMO_MODELS if not p.is_file()]
    if missing:
        pytest.skip(f"the demo models are not built ({', '.join(missing)}): run tools/host/make_models.sh")
    base = tmp_path / "demo-base"
    demo.prepare(base)
    with ComfyServer(base, {"mixofshow": REPO}) as server:
        saved = mixofshow_run.run(demo.graph(1, 256, 128), server.url, tmp_path / "out")
    names = [Path(p).name for p in saved]
    assert any(n.startswith("mixofshow_regions") for n in names)  # the previews come first
    image = demo.sampled_image(saved)
    assert image.name.startswith(demo.DEMO_PREFIX) and Image.open(image).size == (256, 128)
