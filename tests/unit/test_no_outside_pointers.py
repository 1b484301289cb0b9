"""No file of the repository points outside it: the design lives in docs/design.md, and a pointer to the
project's shared folder (specs and references beside the repository) means nothing to anyone who clones it.

Every git-tracked text file (.py, .js, .md, .toml, .sh, .json) is scanned, except recorded fixtures."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = (".py", ".js", ".md", ".toml", ".sh", ".json")
EXCLUDED_DIRS = ("tests/fixtures/",)
# Written in pieces so that this file does not match itself.
POINTERS = (".." + "/shared", "/shared" + "/design")

def _tracked_text_files() -> list[str]:
    done = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = [n for n in done.stdout.decode().split("\0") if n]
    return sorted(n for n in names if n.endswith(SUFFIXES) and not n.startswith(EXCLUDED_DIRS)
                  and (REPO / n).is_file())


def _pointers(name: str) -> list[str]:
    """``file:line: text`` of every line of a file that holds a pointer outside the repository."""
    text = (REPO / name).read_bytes().decode("utf-8", errors="replace")
    return [f"{name}:{i}: {line.strip()[:160]}" for i, line in enumerate(text.splitlines(), start=1)
            if any(p in line for p in POINTERS)]


def test_no_tracked_file_points_outside_the_repository():
    found = [hit for name in _tracked_text_files() for hit in _pointers(name)]
    assert not found, ("these lines point outside the repository; point to docs/design.md (its § sections) "
                       "instead:\n" + "\n".join(found))
