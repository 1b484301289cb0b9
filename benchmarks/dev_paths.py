"""``import dev_paths`` first in a benchmark run as a file: the folders of tools/dev_paths.py (one list)."""
import runpy
from pathlib import Path

REPO = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "dev_paths.py"))["REPO"]
