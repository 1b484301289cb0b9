"""The fusion cache's versions (fusion/versions.py): the code behind the recorded rows and behind the solve is
pinned here, so a real change of either fails until its version is bumped; comments, docstrings and log lines
never count, nor do type annotations, and a UI or tooltip edit (nodes/*_nodes.py) is outside both."""
from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import pytest

from fusion import versions
from fusion.merge import cache as fc

REPO = Path(__file__).resolve().parents[2]
# What the rows recorded for a fusion depend on: the stages, the recorder, the layer-wise encoding and its tensor,
# concept prompts, how LoRAs and fused deltas become patches, and the layer tables.
RECORDING_SOURCES = ("fusion/merge/gradient_fusion.py", "nodes/glue/fusion_recording.py", "nodes/glue/layerwise.py",
                     "fusion/prompts/layerwise_tensor.py", "fusion/prompts/concepts.py", "nodes/glue/lora_patch.py",
                     "nodes/glue/fused_patches.py", "fusion/families/profile.py", "fusion/families/sd15.py",
                     "fusion/families/sdxl.py")
SOLVER_SOURCES = ("fusion/merge/solver.py", "fusion/merge/gradient_fusion.py")
# (version, digest of the sources' code) for each version in use; add a line when a version is bumped.
PINNED = {
    ("recording", 1): "1dddefa89e95795e3bea945883a917872c64a940079dbb8cf378d0c6f335baf3",
    ("solver", 1): "7ed4804d09a20c1e8e45ab35af43d904662e98a8093b416fe2bcca12cd88971a",
}


def _is_log_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name)
            and node.value.func.value.id == "log")


class _Normalise(ast.NodeTransformer):
    """Drops docstrings, log lines and type annotations (comments are not in the tree)."""

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.annotation = None
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is None:
            return None
        return ast.Assign(targets=[node.target], value=self.visit(node.value), lineno=node.lineno)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [n for n in body if not _is_log_call(n)]
            if kept and isinstance(kept[0], ast.Expr) and isinstance(kept[0].value, ast.Constant) \
                    and isinstance(kept[0].value.value, str):
                kept = kept[1:]
            node.body = kept or [ast.Pass()]
        return node


def code_digest(sources: tuple[str, ...], root: Path = REPO) -> str:
    h = hashlib.sha256()
    for rel in sources:
        tree = _Normalise().visit(ast.parse((root / rel).read_text()))
        h.update(rel.encode() + b"\0" + ast.dump(tree, include_attributes=False).encode() + b"\0")
    return h.hexdigest()


@pytest.mark.parametrize("what, sources, version", [
    ("recording", RECORDING_SOURCES, versions.RECORDING_VERSION),
    ("solver", SOLVER_SOURCES, versions.SOLVER_VERSION),
])
def test_the_code_behind_each_cache_version_is_pinned(what, sources, version):
    got = code_digest(sources)
    assert PINNED.get((what, version)) == got, (
        f"the {what} code changed ({', '.join(sources)}). If the change can alter what a fusion records or "
        f"solves, bump {what.upper()}_VERSION in fusion/versions.py and pin ({what!r}, {version + 1}): {got!r}; "
        f"if it cannot, update the pinned digest of ({what!r}, {version}) to {got!r}")


def test_comments_docstrings_and_log_lines_do_not_count(tmp_path):
    rel = "fusion/merge/solver.py"
    source = (REPO / rel).read_text()
    (tmp_path / rel).parent.mkdir(parents=True)
    edited = source.replace('"""', '"""Edited. ', 1).replace("\n\n\ndef ", "\n\n\n# a comment\ndef ", 1)
    edited = edited.replace("\nimport torch\n", "\nimport torch\n\nlog.info('x')\n", 1)
    (tmp_path / rel).write_text(edited)
    annotated = re.sub(r"def _work_device\(device[^)]*\)", "def _work_device(device: object)", edited, count=1)
    assert annotated != edited
    edited = annotated
    assert edited != source and code_digest((rel,), tmp_path) == code_digest((rel,))
    (tmp_path / rel).write_text(source.replace("def ", "def renamed_", 1))
    assert code_digest((rel,), tmp_path) != code_digest((rel,))


def test_the_code_version_is_the_versions_and_the_host():
    host = "ComfyUI 0.3.75"
    v = fc.code_version(host)
    assert v == fc.code_version(host)
    assert len({v, fc.code_version("ComfyUI 0.3.76"), fc.code_version(host, recording=2),
                fc.code_version(host, solver=2)}) == 4


def test_entries_of_release_0_2_0_are_valid_only_for_the_same_recording_and_solve(monkeypatch):
    host = "ComfyUI 0.3.75"
    assert versions.RECORDING_VERSION == 1 and versions.SOLVER_VERSION == 1
    assert len(fc.legacy_code_versions(host)) == 1
    monkeypatch.setattr(fc, "RECORDING_VERSION", 2)
    assert fc.legacy_code_versions(host) == []
