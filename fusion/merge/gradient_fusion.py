"""The gradient-fusion procedure (docs/design.md §5) without ComfyUI: what is fused (the plan), the three stages
in order, each concept's rows folded in as they are recorded, the per-layer solves, and progress.

A :class:`Recorder` produces the rows: ``nodes/glue/fusion_recording.py`` inside ComfyUI, or a plain-torch
stand-in in the unit tests. Everything here is plain torch.

Conventions
-----------
* Weights are named by their ComfyUI state-dict key: MODEL keys (``diffusion_model.….weight``) and CLIP
  keys relative to ``cond_stage_model`` (``clip_l.transformer.….weight``). A concept's LoRA is
  ``(up, down)`` per key with the file's alpha/rank folded into ``up`` and no strength;
  ``ΔW_i = strength · up @ down``.
* Stage of a weight: every CLIP weight is "text"; ``attn2.to_k`` / ``attn2.to_v`` are "cross_kv" (their
  input is the text encoder's output); every other MODEL weight is "unet".
* Input groups: modules that always see the same input share one recording: attn1 ``to_q/to_k/to_v``
  in the UNet, ``q_proj/k_proj/v_proj`` in CLIP, ``to_k/to_v`` of one cross-attention layer.
* Only linear and 1×1-conv weights are fused (their input rows determine the output); a LoRA on a
  larger convolution (LoCon) is refused (unfolding a 3×3 conv's inputs multiplies the recorded width
  by 9: ~0.5 GB of Gram per 1280-channel layer).
* The result per weight is the factored change ``(U, C)``: ``W* = W0 + U @ C`` (fusion.merge.solver).
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from ..errors import FusionError
from ..families import SD15, ModelFamily
from . import solver as S
from .heap import release_free_heap

STAGES = ("text", "cross_kv", "unet")
SOLVERS = ("closed_form", "lbfgs")
# Reference L-BFGS iteration counts (docs/design.md §5.9): text encoder and cross-attention k/v, other UNet layers.
LBFGS_ITERATIONS = {"text": 500, "cross_kv": 500, "unet": 50}
# The reference's schedule: DPM-Solver++ (2M) on linspace timesteps (see fusion_recording).
REFERENCE_SAMPLER = "reference"
# Ridge of every closed-form solve, relative to tr(G)/in; chosen by benchmarks/bench_fusion_quality.py.
DEFAULT_RIDGE = 0.1
UNET_ROOT = "diffusion_model."

Factors = Mapping[str, "tuple[torch.Tensor, torch.Tensor]"]



@dataclass(frozen=True)
class FusionSettings:
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0
    solver: str = "closed_form"
    sampler: str = REFERENCE_SAMPLER
    scheduler: str = "normal"
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, not {self.solver!r}")
        if not self.ridge >= 0.0:
            raise ValueError(f"ridge must be >= 0, not {self.ridge}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def concept_prompts(words: str) -> tuple[str, str]:
    """The two recording prompts of a concept named by ``words`` (its tokens in file order, or a plain
    LoRA's trigger words): ``("photo of a <words>", "<words>")``."""
    if not words.strip():
        raise ValueError("a concept needs tokens or trigger words")
    return f"photo of a {words}", words


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ConceptLoRA:
    """What fusion needs of one concept: its LoRA factors by weight key, and its strengths."""
    name: str
    text: Factors
    unet: Factors
    text_strength: float = 1.0
    unet_strength: float = 1.0


@dataclass(frozen=True)
class Target:
    """One weight to fuse."""
    key: str                  # state-dict key (MODEL key, or CLIP key relative to cond_stage_model)
    part: str                 # "model" | "clip"
    stage: str                # "text" | "cross_kv" | "unet"
    group: str                # module path whose input is recorded (its input group)
    shape: tuple[int, ...]    # weight shape
    layer: int | None = None  # cross-attention layer (table row) of a cross_kv weight

    @property
    def in_features(self) -> int:
        return int(self.shape[1])


def stage_of(part: str, key: str) -> str:
    if part == "clip":
        return "text"
    return "cross_kv" if re.search(r"\.attn2\.to_[kv]\.weight$", key) else "unet"


def input_group(module: str) -> str:
    """Modules that always see the same input map to one name (the one whose input is recorded)."""
    module = re.sub(r"\.attn1\.to_[kv]$", ".attn1.to_q", module)
    module = re.sub(r"\.attn2\.to_v$", ".attn2.to_k", module)
    return re.sub(r"\.self_attn\.[kv]_proj$", ".self_attn.q_proj", module)


def cross_attention_layer(key: str, family: ModelFamily) -> int:
    """Which cross-attention layer (ED-LoRA table row) an attn2 weight belongs to."""
    layer = family.layer_of_weight(key)
    if layer is None:
        raise FusionError(f"{key}: not in one of {family.label}'s {family.layer_count} cross-attention layers")
    return layer


@dataclass
class FusionPlan:
    targets: list[Target]
    deltas: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per concept: key -> (α·up [out, r], down [r, in])
    names: list[str]
    family: ModelFamily = SD15

    @property
    def concepts(self) -> int:
        return len(self.deltas)

    def stage_groups(self, stage: str) -> dict[str, list[Target]]:
        groups: dict[str, list[Target]] = {}
        for t in self.targets:
            if t.stage == stage:
                groups.setdefault(t.group, []).append(t)
        return groups

    def keys(self, part: str) -> set[str]:
        return {t.key for t in self.targets if t.part == part}


def make_plan(concepts: Sequence[ConceptLoRA], clip_shapes: Mapping[str, tuple[int, ...]],
              model_shapes: Mapping[str, tuple[int, ...]], family: ModelFamily = SD15) -> FusionPlan:
    """Every weight some concept has a LoRA on, validated against the weights' shapes.

    Raises :class:`FusionError` naming the concept and key for a key the MODEL/CLIP lacks, factors of
    the wrong shape, or a LoRA on a convolution larger than 1×1."""
    targets: dict[str, Target] = {}
    deltas = []
    for c in concepts:
        mine = {}
        for part, factors, strength, shapes in (("clip", c.text, c.text_strength, clip_shapes),
                                                ("model", c.unet, c.unet_strength, model_shapes)):
            for key, (up, down) in factors.items():
                shape = shapes.get(key)
                what = "CLIP" if part == "clip" else "MODEL"
                if shape is None:
                    raise FusionError(f"{c.name}: its LoRA patches '{key}', which this {what} does not have "
                                      f"(a LoRA for another base model?)")
                if len(shape) == 4 and tuple(shape[2:]) != (1, 1):
                    raise FusionError(f"{c.name}: its LoRA patches the {shape[2]}x{shape[3]} convolution '{key}' "
                                      f"(LoCon); gradient fusion fuses linear and 1x1-conv layers only -- use a "
                                      f"LoRA without conv layers, or give this concept its own region instead")
                if len(shape) not in (2, 4) or up.shape[0] != shape[0] or down.shape[0] != up.shape[1] \
                        or down[0].numel() != shape[1]:
                    raise FusionError(f"{c.name}: LoRA factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                                      f"the {what} weight '{key}' {tuple(shape)} (another base model?)")
                if key not in targets:
                    stage = stage_of(part, key)
                    module = key[:-len(".weight")] if key.endswith(".weight") else key
                    targets[key] = Target(key, part, stage, input_group(module), tuple(shape),
                                          cross_attention_layer(key, family) if stage == "cross_kv" else None)
                if float(strength) != 0.0:
                    mine[key] = (float(strength) * up.reshape(up.shape[0], -1).float(),
                                 down.reshape(down.shape[0], -1).float())
        deltas.append(mine)
    ordered = sorted(targets.values(), key=lambda t: (STAGES.index(t.stage), t.key))
    for t in ordered:  # members of one input group must agree on its width
        first = next(x for x in ordered if x.group == t.group)
        if first.in_features != t.in_features:
            raise FusionError(f"{t.key} and {first.key} should share their input but are {t.in_features} and "
                              f"{first.in_features} wide")
    return FusionPlan(ordered, deltas, [c.name for c in concepts], family)


# --------------------------------------------------------------------------- running it

Sink = Callable[[str, torch.Tensor, bool], None]          # (group, rows, channels_first)
Progress = Callable[[int, int, str], None]                # (done, total, what is happening)
Tap = Callable[[str, int, str, torch.Tensor, bool], None]  # (stage, concept, group, rows, channels_first)


class Recorder(Protocol):
    def record(self, stage: str, concept: int, fused: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               groups: Mapping[str, int | None], sink: Sink, on_step: Callable[[int, int], None]) -> None:
        """Produce concept ``concept``'s rows for ``stage`` and pass them to ``sink(group, rows,
        channels_first)``, for every group in ``groups`` (group -> cross-attention layer for "cross_kv").
        ``fused``: the changes solved by the earlier stages (key -> ``(U, C)``), which the recording
        uses in place of the concept's own LoRA on those weights. ``on_step(step, steps)`` while sampling."""


@dataclass
class SolvedLayer:
    """One solved weight with its recorded problem (kept on request: tests and benchmarks)."""
    target: Target
    inputs: S.FoldedInputs
    problem: S.LayerProblem


@dataclass
class FusionResult:
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (U [out, R], C [R, in]) float32, CPU
    seconds: dict[str, float] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)  # weights whose input never ran (left at W0)
    solved: list[SolvedLayer] = field(default_factory=list)


class _Progress:
    def __init__(self, callback: Progress | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def report(self, advance: int, text: str) -> None:
        self.done = min(self.total, self.done + advance)
        if self.callback is not None:
            self.callback(self.done, self.total, text)


def _stage_text(stage: str, i: int, n: int) -> str:
    return {"text": f"text encoder {i + 1}/{n}", "cross_kv": f"cross-attention k/v {i + 1}/{n}"}[stage]


def run_fusion(plan: FusionPlan, recorder: Recorder, settings: FusionSettings, progress: Progress | None = None,
               *, keep_problems: bool = False, tap: Tap | None = None) -> FusionResult:
    """The three stages in order (text encoder, cross-attention k/v, other UNet layers); each stage records
    every concept with the changes of the earlier stages, folding its rows into one
    :class:`~fusion.solver.FoldedInputs` per input group (memory independent of the number of concepts),
    then solves its weights. One concept: its own LoRA is the result (objective 0), nothing is recorded.

    ``progress(done, total, text)`` runs after every concept, sampling step and solved weight (raise from
    it to interrupt). ``keep_problems`` keeps every solved layer's inputs in the result; ``tap`` sees
    every recorded row (tests, benchmarks)."""
    n = plan.concepts
    stages = [s for s in STAGES if plan.stage_groups(s)]
    n_targets = len(plan.targets)
    record_units = {"text": n, "cross_kv": n, "unet": n * settings.steps} if n > 1 else {}
    bar = _Progress(progress, sum(record_units.get(s, 0) for s in stages) + n_targets)
    result = FusionResult({})
    solved = 0
    for stage in stages:
        groups = plan.stage_groups(stage)
        t0 = time.perf_counter()
        if n == 1:
            for targets in groups.values():
                for t in targets:
                    if t.key in plan.deltas[0]:
                        up, down = plan.deltas[0][t.key]
                        result.deltas[t.key] = (up.clone(), down.clone())
                    solved += 1
                    bar.report(1, f"merging {solved}/{n_targets} layers")
            result.seconds[stage] = time.perf_counter() - t0
            continue
        accs = {g: S.FoldedInputs(targets[0].in_features) for g, targets in groups.items()}
        layers = {g: targets[0].layer for g, targets in groups.items()}
        for i in range(n):
            for g, targets in groups.items():
                accs[g].begin_concept({t.key: plan.deltas[i][t.key][1] for t in targets if t.key in plan.deltas[i]})

            def sink(group: str, rows: torch.Tensor, channels_first: bool = False, _i: int = i,
                     _accs: dict[str, S.FoldedInputs] = accs, _stage: str = stage) -> None:
                _accs[group].add(rows, channels_first)
                if tap is not None:
                    tap(_stage, _i, group, rows, channels_first)

            def on_step(step: int, steps: int, _i: int = i) -> None:
                bar.report(1, f"UNet: concept {_i + 1} of {n}, step {step}/{steps}")

            if stage != "unet":
                bar.report(0, _stage_text(stage, i, n))
            recorder.record(stage, i, dict(result.deltas), layers, sink, on_step)
            if stage != "unet":
                bar.report(1, _stage_text(stage, i, n))
        t1 = time.perf_counter()
        result.seconds[f"{stage}_record"] = t1 - t0
        # cheapest solves first: the widest runs when the fewest accumulators are still held (design §5.7)
        solve_order = sorted(groups, key=lambda g: S.solve_work_bytes(accs[g]))
        staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kept: dict[str, SolvedLayer] = {}
        for g in solve_order:
            targets = groups[g]
            acc = accs.pop(g)  # solved groups' accumulators go while the others solve
            problems = [S.LayerProblem(t.key, {i: plan.deltas[i][t.key][0] for i in range(n)
                                               if t.key in plan.deltas[i]})
                        for t in targets]
            if acc.count == 0:
                result.unrecorded += [t.key for t in targets]
                solved += len(targets)
                bar.report(len(targets), f"solving {solved}/{n_targets} layers")
                continue
            if settings.solver == "closed_form":
                changes = S.solve_closed_form(acc, problems, ridge=settings.ridge)
            else:
                changes = {p.name: S.solve_lbfgs(acc, p, LBFGS_ITERATIONS[stage]) for p in problems}
            for t, p in zip(targets, problems, strict=True):
                up, down = changes[p.name]
                staged[t.key] = (up.cpu(), down.cpu())
                if keep_problems:
                    kept[t.key] = SolvedLayer(t, acc, p)
            del acc, changes
            release_free_heap()  # the solve's float64 work and this group's accumulator, before the next solve
            solved += len(targets)
            bar.report(len(targets), f"solving {solved}/{n_targets} layers")
        for targets in groups.values():  # the results in the plan's order, whatever the order of the solves
            for t in targets:
                if t.key in staged:
                    result.deltas[t.key] = staged[t.key]
                if t.key in kept:
                    result.solved.append(kept[t.key])
        result.seconds[f"{stage}_solve"] = time.perf_counter() - t1
        result.seconds[stage] = time.perf_counter() - t0
    if progress is not None:
        progress(bar.total, bar.total, f"fused {n} concept{'s' if n != 1 else ''} into {len(result.deltas)} layers")
    return result
