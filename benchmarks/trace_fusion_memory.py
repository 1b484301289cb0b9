"""Where a whole gradient fusion's memory goes: one fusion of N synthetic whole-block ED-LoRAs (the settings of
benchmarks/bench_fusion.py), traced at every recording and solve of every stage and concept.

    flock /tmp/mixofshow-bigmodel.lock .host/venv/bin/python benchmarks/trace_fusion_memory.py --concepts 7
    .host/venv/bin/python benchmarks/trace_fusion_memory.py --tiny --concepts 3

One line per event: VmRSS and the high-water mark since the previous event (``/proc/self/status``, reset through
``/proc/self/clear_refs``), glibc's heap in use / free in its arenas / mmapped (``mallinfo2``), the bytes every live
:class:`FoldedInputs` holds (rows, Gram, M, down factors), the bytes of every live CPU tensor storage found by
``gc`` (deduplicated by storage), and ComfyUI's loaded models. ``--trim`` calls ``malloc_trim(0)`` after each
event (RSS that then disappears was free heap, not live objects).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path

import dev_paths  # noqa: F401  # isort: split
from bench_fusion import FULL_CKPT, _status_kib, load_model, start_comfy  # noqa: E402

_libc = ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc.mallinfo2.restype = _Mallinfo2
MIB = 2 ** 20


def live_tensor_bytes() -> tuple[int, int]:
    """(bytes, count) of the distinct CPU storages of every tensor gc can see."""
    import torch

    seen: dict[int, int] = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                s = o.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        except Exception:  # noqa: BLE001 - odd tensor subclasses
            pass
    return sum(seen.values()), len(seen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every event")
    ap.add_argument("--tensors", action="store_true", help="also count live tensors (slow: gc over every object)")
    args = ap.parse_args(argv)
    if not args.tiny and not FULL_CKPT.is_file():
        print(f"SKIP: {FULL_CKPT} is missing")
        return 0
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    pack, env = start_comfy(False)
    os.environ["MIXOFSHOW_FUSION_CACHE"] = tempfile.mkdtemp(prefix="mixofshow-trace-cache-")
    from synthetic import make_edlora_state

    model, clip, shape = load_model(not args.tiny, False, env)
    en, folders = pack("nodes.glue.loading"), pack("nodes.glue.folders")
    concepts, m, c = None, model, clip
    folder = Path(folders.folder_paths.get_folder_paths("edloras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.concepts):
        name = f"bench_{'tiny' if args.tiny else 'full'}_{i}.pth"
        torch.save(make_edlora_state((f"<bench{i}a>", f"<bench{i}b>"), seed=100 + i, whole_block=True, **shape),
                   folder / name)
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 1.0)
    del m, c
    gf, solver = pack("fusion.merge.gradient_fusion"), pack("fusion.merge.solver")
    rec_mod, run = pack("nodes.glue.fusion_recording"), pack("nodes.glue.fusion_run")
    import comfy.model_management as mm

    live: list[weakref.ref] = []
    init = solver.FoldedInputs.__init__

    def tracked_init(self, *a, **kw):
        init(self, *a, **kw)
        live.append(weakref.ref(self))

    solver.FoldedInputs.__init__ = tracked_init
    gc.collect()
    base_rss = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t_start = time.perf_counter()
    print(f"model resident: {base_rss / 1024:.0f} MiB; N={args.concepts}, {args.steps} steps at {args.size}")
    print(f"{'event':28s} {'t':>6s} {'RSS':>7s} {'HWM':>7s} {'heap use':>8s} {'free':>7s} {'mmap':>7s} "
          f"{'acc rows':>8s} {'gram':>7s} {'M+D':>6s} {'groups r/g':>10s}"
          + (f" {'tensors':>8s} {'#':>6s}" if args.tensors else "") + "  loaded models")

    def event(what: str) -> None:
        hwm = _status_kib("VmHWM") - base_rss
        if args.trim:
            _libc.malloc_trim(0)
        rss = _status_kib("VmRSS") - base_rss
        mi = _libc.mallinfo2()
        accs = [a for a in (r() for r in live) if a is not None]
        tot = {"rows": 0, "gram": 0, "rhs": 0, "downs": 0}
        for a in accs:
            for k, v in a.held_bytes().items():
                tot[k] += v
        n_rows = sum(a.in_row_mode for a in accs)
        line = (f"{what:28s} {time.perf_counter() - t_start:6.1f} {rss / 1024:6.0f}M {hwm / 1024:6.0f}M "
                f"{mi.uordblks / MIB:7.0f}M {mi.fordblks / MIB:6.0f}M {mi.hblkhd / MIB:6.0f}M "
                f"{tot['rows'] / MIB:7.0f}M {tot['gram'] / MIB:6.0f}M {(tot['rhs'] + tot['downs']) / MIB:5.0f}M "
                f"{n_rows:4d}/{len(accs) - n_rows:<5d}")
        if args.tensors:
            b, n = live_tensor_bytes()
            line += f" {b / MIB:7.0f}M {n:6d}"
        loaded = [f"{type(lm.model.model).__name__}:{lm.model.loaded_size() / MIB:.0f}M"
                  for lm in mm.current_loaded_models if lm.model is not None]
        print(line + "  " + " ".join(loaded), flush=True)
        Path("/proc/self/clear_refs").write_text("5")

    record = rec_mod.ComfyRecorder.record

    def traced_record(self, stage, concept, *a, **kw):
        record(self, stage, concept, *a, **kw)
        gc.collect()
        event(f"{stage} recorded {concept + 1}")

    rec_mod.ComfyRecorder.record = traced_record
    solve = solver.solve_closed_form
    solves = {"n": 0}

    def traced_solve(inputs, problems, *a, **kw):
        out = solve(inputs, problems, *a, **kw)
        solves["n"] += 1
        if inputs.in_features >= 2560 or solves["n"] % 40 == 0:
            event(f"solved {'rows' if inputs.in_row_mode else 'gram'} {inputs.in_features}x{inputs.count}")
        return out

    solver.solve_closed_form = traced_solve
    gf.S.solve_closed_form = traced_solve
    settings = gf.FusionSettings(steps=args.steps, width=args.size, height=args.size, seed=0)
    with torch.inference_mode():
        fm, fc, _fcs, stats = run.fuse(model, clip, concepts, settings, use_cache=True)
        event("fused, cache written")
    print({k: round(v, 1) for k, v in stats["seconds"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
