"""benchmarks/gpu_check.sh --dry-run: every row of its table of checks runs (tiny settings, on the CPU) and
reaches the report with its figures, so the GPU script cannot rot while no GPU runs it. The rows are read
from the script, so a row added there is checked here without an edit."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SD15_CHECKPOINT = REPO / ".host" / "models" / "sd15_random_fp16.safetensors"


def check_rows() -> list[tuple[str, str]]:
    """(name, shown as) of each row of the script's CHECKS table."""
    table = re.search(r"^CHECKS=\($(.*?)^\)$", SCRIPT.read_text(), re.M | re.S)
    assert table, "gpu_check.sh has no CHECKS=( ... ) table"
    rows = [ln.strip().strip('"') for ln in table.group(1).splitlines() if ln.strip().startswith('"')]
    return [(fields[0].strip(), fields[5].strip()) for fields in (r.split("|") for r in rows)]


def test_the_checks_table_is_well_formed():
    rows = check_rows()
    assert len(rows) >= 5 and len({name for name, _ in rows}) == len(rows)
    limits = [int(r.split("|")[2]) for r in re.findall(r'^  "([^"]*)"$', SCRIPT.read_text(), re.M)]
    assert len(limits) == len(rows) and all(limit > 0 for limit in limits)


def test_dry_run_reports_every_check(tmp_path):
    if not SD15_CHECKPOINT.is_file():
        pytest.skip(f"no full-size random SD1.5 at {SD15_CHECKPOINT} (the regional rows load it)")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path)})
    report = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DRY RUN" in report
    for number, (name, how) in enumerate(check_rows(), 1):
        heading = re.search(rf"^{number}\. {re.escape(name)}: .* \[\d+ s, (.*)\]$", report, re.M)
        assert heading, f"row {name} is missing from the report:\n{report}"
        assert heading.group(1) == "ok", f"row {name}: {heading.group(1)}\n{(tmp_path / f'{name}.log').read_text()}"
        body = report[heading.end():].split(f"\n{number + 1}. ")[0]
        patterns = {"fusion": r"^\s+\d+\s+\d+\.\d", "solver": r"\bq_proj\b.*\d+x", "train": r"^\s+ours\s+\d+\.\d"}
        # a formatter's figures, or lines:/after:REGEX (report lines are indented)
        shown = patterns[how] if how in patterns else how.split(":", 1)[1].lstrip("^")
        assert re.search(shown, body, re.M), f"row {name} shows no figures:\n{body}"
