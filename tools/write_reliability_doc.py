"""Render docs/reliability.md from the reliability tier's last run.

    bash tools/test.sh tests/reliability -q -s          # writes .reliability/last_run.json
    .host/venv/bin/python tools/write_reliability_doc.py

The figures come from the tier's summary (``.reliability/last_run.json``, written by
tests/reliability/conftest.py at the end of its session; a failed or partial run is refused). The
unit-level bad-file fuzz (tests/unit/test_bad_files.py) is run here with ``-s`` for its counts: it
takes seconds and prints them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / ".reliability" / "last_run.json"
DOC = REPO / "docs" / "reliability.md"
FUZZ_ARGS = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_bad_files.py", "-s"]
SECTIONS = ("soak", "cancel", "clean_models")


class Refused(Exception):
    pass


def read_summary(path: Path) -> dict:
    if not path.is_file():
        raise Refused(f"no {path}: run `bash tools/test.sh tests/reliability -q -s` first")
    summary = json.loads(path.read_text())
    missing = [s for s in SECTIONS if s not in summary["figures"]]
    if summary["exit_status"] != 0 or missing or len(summary["figures"]["cancel"]) != 2:
        raise Refused(f"the run in {path} ({summary['command']}, {summary['date']}) failed or was partial "
                      f"(exit status {summary['exit_status']}, missing {missing or 'a cancel'}): run the whole "
                      f"tier again")
    return summary


def run_fuzz() -> dict:
    """Run tests/unit/test_bad_files.py with -s; its fuzz counts per mutation kind and the test count."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    done = subprocess.run([sys.executable, *FUZZ_ARGS], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = done.stdout
    head = re.search(r"^fuzzed (\d+) files \(seed (\d+)\):$", out, re.M)
    passed = re.search(r"(\d+) passed", out)
    if done.returncode != 0 or not head or not passed:
        raise Refused("tests/unit/test_bad_files.py failed or printed no fuzz counts:\n"
                      f"{out[-3000:]}{done.stderr[-2000:]}")
    kinds = re.findall(r"^\s+(\w+)\s+loaded\s+(\d+)\s+refused\s+(\d+)$", out[head.end():], re.M)
    return {"command": f"{Path(sys.executable).name} " + " ".join(FUZZ_ARGS), "date": date,
            "files": int(head.group(1)), "seed": int(head.group(2)), "tests_passed": int(passed.group(1)),
            "kinds": [(k, int(loaded), int(refused)) for k, loaded, refused in kinds]}


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def short_message(message: str) -> str:
    """One line for a table: the exception's class without its module path (ComfyUI reports the
    custom node's module by its file path), at most 140 characters, pipes escaped."""
    message = re.sub(r"^\S*\.(\w+: )", r"\1", " ".join(message.split()).split(" — ")[0])
    return message[:140].replace("|", "\\|")


def render(summary: dict, fuzz: dict) -> str:
    f = summary["figures"]
    soak, cancels, clean = f["soak"], f["cancel"], f["clean_models"]
    host = summary["host"]
    faults = soak["faults"]
    lines = [
        "# Reliability",
        "",
        "Figures of the last run of the reliability tier (`tests/reliability`): one real ComfyUI server on",
        "127.0.0.1 with the pack and the test fixture pack (tiny random models with SD1.5's key names), a",
        "soak of mixed prompts with bad inputs among them, `/interrupt` in the middle of a fusion and of a",
        "regional sampling, and a stock-only prompt before and after all of it. Regenerate this page with",
        "",
        "```",
        "bash tools/test.sh tests/reliability -q -s",
        ".host/venv/bin/python tools/write_reliability_doc.py",
        "```",
        "",
        f"**Run:** `{summary['command'].strip()}` on {summary['date']} (commit {summary['commit']}), "
        f"{host['cpus']} CPU cores, Python {host['python']}, torch {host['torch']}, ComfyUI {host['comfyui']}: "
        f"{summary['tests']['collected']} tests, {summary['tests']['failed']} failed.",
        "",
        "| figure | last run |",
        "|---|---|",
        f"| prompts held | {soak['prompts_held']} of {soak['prompts']} completed (order shuffled from seed "
        f"{soak['order_seed']}) |",
        f"| deterministic per seed | {soak['repeats_equal']} of {soak['repeats']} repeats pixel-equal to the first run "
        f"(each really ran again: its sampler and fusion were not taken from ComfyUI's cache) |",
        f"| fusion disk cache | {soak['fusion_cache_hits']} hits, {soak['fusion_cache_misses']} misses; cached = "
        f"uncached image |",
        f"| faults survived | {soak['faults_survived']} of {len(faults)} bad prompts, the server answering and its "
        f"queue empty after each |",
        f"| bad inputs tried | {len(faults)} in the soak; {fuzz['files']} fuzzed files and "
        f"{fuzz['tests_passed']} tests in all in `tests/unit/test_bad_files.py` (below) |",
        f"| server RSS | {soak['rss_mib_after_5th']:.1f} MiB after prompt 5, {soak['rss_mib_after_last']:.1f} MiB "
        f"after prompt {soak['prompts']} ({soak['rss_change_percent']:+.1f} %; limit ±10 %), each read after the "
        f"model-state probe's prompt; {min(soak['rss_mib']):.1f}–{max(soak['rss_mib']):.1f} MiB right after the "
        f"soak's prompts |",
    ]
    for name, c in cancels.items():
        stage = f" (the node showing \"{c['stage']}\")" if c.get("stage") else ""
        lines.append(f"| cancel during {name} | interrupted in {c['interrupted_node']} after step {c['last_step']} "
                     f"of {c['steps']}{stage}, {1000 * c['seconds_to_stop']:.0f} ms after `/interrupt`; hooks left "
                     f"{c['hooks_left']}, model state unchanged: {yes(c['state_unchanged'])}, next prompt "
                     f"pixel-equal: {yes(c['next_prompt_equal'])} |")
    lines += [
        f"| clean models | stock prompt after the tier pixel-equal to before: {yes(clean['stock_equal'])}; model "
        f"state as before: {yes(clean['state_equal'])} |",
        f"| timings | tier {f['tier_seconds']:.1f} s (server start {f['server_start_seconds']:.1f} s, soak "
        f"{soak['seconds']:.1f} s) |",
        "",
        "## Soak",
        "",
        "Every kind of prompt (tests/support/reliability_graphs.py) runs at seed 1 twice and at seed 2 once;",
        "Gradient Fusion nine times (seed 1: uncached twice, cached twice; seed 2: uncached once, cached",
        "twice; seed 3: once each). Seconds per prompt, from `POST /prompt` to its `/history` entry:",
        "",
        "| kind | runs | mean s | max s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {kind} | {t['runs']} | {t['mean']:.2f} | {t['max']:.2f} |"
              for kind, t in soak["seconds_per_kind"].items()]
    lines += ["",
              "Server RSS (MiB) right after each of the 30 prompts (it moves with what the prompt left in ComfyUI's",
              "cache until the next one, e.g. a fusion's fused weights):", "",
              "```", " ".join(f"{r:.0f}" for r in soak["rss_mib"]), "```", "",
              "## Bad inputs in the soak", "",
              "| bad prompt | answer | node named | message (start) | server served after |",
              "|---|---|---|---|---|"]
    for fault in faults:
        answer = "HTTP 400" if fault["http_status"] == 400 else "execution error"
        lines.append(f"| {fault['name']} | {answer} | {fault['node']} | {short_message(fault['message'])} | "
                     f"{yes(fault['served_after'])} |")
    lines += [
        "",
        "## Unit-level bad-file fuzz",
        "",
        "`tests/unit/test_bad_files.py` builds hostile ED-LoRA files by hand (code-running pickles, deflate",
        f"bombs, lying zip directories, bad safetensors headers) and fuzzes {fuzz['files']} files from seed "
        f"{fuzz['seed']}: each must load correctly or be refused naming the file. `{fuzz['command']}` on "
        f"{fuzz['date']}: {fuzz['tests_passed']} tests passed; the fuzz's counts:",
        "",
        "| mutation | loaded | refused |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {loaded} | {refused} |" for kind, loaded, refused in fuzz["kinds"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, default=SUMMARY, help=f"the tier's summary (default {SUMMARY})")
    parser.add_argument("--out", type=Path, default=DOC, help=f"the page to write (default {DOC})")
    args = parser.parse_args(argv)
    try:
        text = render(read_summary(args.summary), run_fuzz())
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
