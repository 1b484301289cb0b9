"""Regenerate example_workflows/*.json (ComfyUI's UI format) from the API-format graphs the demo uses,
by loading each into the real web UI (app.loadApiJson) and serialising the graph, so widget order and
links are exactly what the frontend expects.

usage: .host/venv/bin/python tools/make_example_workflows.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "host"))
sys.path.insert(0, str(REPO / "tools"))
from browser import comfy_page  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
import demo  # noqa: E402

EXAMPLES = {"mixofshow_multi_concept": lambda: demo.graph(20, 1024, 512),
            "mixofshow_fusion_regional": lambda: demo.graph(20, 1024, 512, fused=True)}


def main() -> int:
    base = REPO / ".host" / "demo-base"
    demo.prepare(base)
    out_dir = REPO / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    with ComfyServer(base, {"mixofshow": REPO}) as server, comfy_page(server.url) as (page, errors):
        for name, make in EXAMPLES.items():
            # JSON.stringify drops `undefined` fields (they would come back as null and fail the
            # frontend's workflow schema)
            ui = json.loads(page.evaluate("""async ([g, name]) => {
                await app.loadApiJson(g, name);
                return JSON.stringify(app.graph.serialize());
            }""", [make(), name]))
            for node in ui["nodes"]:  # examples should reproduce: fixed seeds
                values = node.get("widgets_values") or []
                node["widgets_values"] = ["fixed" if v == "randomize" else v for v in values] or values
            (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print("wrote", out_dir / f"{name}.json", len(ui["nodes"]), "nodes")
        if errors:
            print("page errors:", errors)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
