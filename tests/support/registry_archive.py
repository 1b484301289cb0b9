"""The archive the Comfy Registry builds from this repository (``comfy node publish``): every
git-tracked file, as it is in the working tree, minus the paths that ``.comfyignore`` matches."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path


def _git_files(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args], check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name]


def is_git_checkout(repo: Path) -> bool:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-inside-work-tree"],
                          capture_output=True).returncode == 0


def archive_files(repo: Path) -> list[str]:
    """Repo-relative paths of the files in the archive, sorted.

    ``.comfyignore`` is matched by git's own gitignore matcher (``ls-files --cached --ignored
    --exclude-from``: the tracked files the patterns match), the syntax the Registry's packer
    emulates with pathspec's "gitwildmatch"; no pattern semantics are re-implemented here. Tracked
    files deleted from the working tree are left out, as the packer does.
    """
    ignore = repo / ".comfyignore"
    ignored = set(_git_files(repo, "--cached", "--ignored", f"--exclude-from={ignore}")) if ignore.is_file() else set()
    return sorted(f for f in _git_files(repo) if f not in ignored and (repo / f).is_file())


def build_archive(repo: Path, zip_path: Path) -> list[str]:
    """Zip the archive's files (working-tree content) into ``zip_path``; returns their paths."""
    files = archive_files(repo)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            archive.write(repo / name, name)
    return files
