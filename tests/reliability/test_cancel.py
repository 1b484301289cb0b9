"""Cancel: ``POST /interrupt`` while a Gradient Fusion samples its recordings and while a regional
sampling with a LoRA per region runs (seen on the websocket: a progress step of that node), then:
nothing is left on the tiny model (no forward hook or pre-hook on its UNet and CLIP modules, no patch
on its patchers: the fixture pack's ModelStateProbe), and a normal prompt gives exactly the image it
gave before the cancel."""
from __future__ import annotations

import numpy as np

import reliability_graphs as rg
from server_events import interrupt_when, progress_of
from server_setup import cached_nodes

HEAVY_STEPS = 100  # far more than the interrupt lets run: each step is tens of ms on the tiny model


def hooks_left(state: dict) -> int:
    return sum(state[part][kind] for part in ("unet", "clip", "global") for kind in ("forward_hooks", "forward_pre_hooks"))


def record(tier, name: str, run, node: str, node_class: str, steps: int, state: dict, equal: bool) -> None:
    tier.figures.setdefault("cancel", {})[name] = {
        "interrupted_node": node_class, "step": int(run.trigger["data"]["value"]),
        "last_step": run.last_step(node), "steps": steps, "seconds_to_interrupt": round(run.seconds_to_trigger, 2),
        "seconds_to_stop": round(run.seconds_to_stop, 3), "hooks_left": hooks_left(state),
        "state_unchanged": state == tier.state_before, "next_prompt_equal": equal}


def test_interrupt_during_fusion_leaves_nothing_behind(tier):
    """Interrupted in fusion's third stage (sampling each concept with forward pre-hooks on the UNet
    layers recording their inputs). The same fusion prompt afterwards gives the image it gave before;
    so does its cached variant, which reads the text-encoder recordings the cancelled run had already
    written to the disk cache (and no half-written entry is there)."""
    names = ("cancel_a.pth", "cancel_b.pth")
    light = rg.fusion(3, cache=False, names=names, kind="cancel_fusion")
    _, before = tier.image(light)
    heavy = rg.fusion(3, cache=True, names=names, steps=HEAVY_STEPS, size=128, kind="cancel_fusion_heavy")
    rows_before = set(tier.fusion_cache.glob("*.rows")) if tier.fusion_cache.exists() else set()
    # stage 3's bar counts every concept's steps: only it reaches 2 x HEAVY_STEPS
    run = interrupt_when(tier.server, heavy.graph, progress_of(heavy.fusion, total_at_least=2 * HEAVY_STEPS))
    assert run.trigger is not None and run.last == "execution_interrupted", [e["type"] for e in run.events]
    assert run.interrupted_node == heavy.fusion
    state = tier.model_state()
    assert hooks_left(state) == 0, state
    assert state == tier.state_before

    written = set(tier.fusion_cache.glob("*.rows")) - rows_before
    assert len(written) == 2, written  # stage 1 finished for both concepts before the interrupt
    assert not list(tier.fusion_cache.glob("*.part")) and not list(tier.fusion_cache.glob("*.fused"))

    entry, again = tier.image(light)
    assert light.fusion not in cached_nodes(entry)
    cached_variant = rg.fusion(3, cache=True, names=names, kind="cancel_fusion")
    _, from_cache = tier.image(cached_variant)
    equal = np.array_equal(before, again) and np.array_equal(before, from_cache)
    record(tier, "fusion", run, heavy.fusion, "MixOfShowGradientFusion", 2 * HEAVY_STEPS, state, equal)
    assert np.array_equal(before, again)
    assert np.array_equal(before, from_cache)


def test_interrupt_during_regional_sampling_leaves_nothing_behind(tier):
    """Interrupted while the Regional KSampler samples two regions that each carry their own LoRA (the
    regional attention's patched clone, the region LoRAs' forward hooks for each UNet call)."""
    light = rg.lora_per_region(5)
    _, before = tier.image(light)
    heavy = rg.lora_per_region(5)
    heavy.graph[heavy.sampler]["inputs"]["steps"] = HEAVY_STEPS
    latent = heavy.graph[heavy.sampler]["inputs"]["latent_image"][0]
    heavy.graph[latent]["inputs"].update(width=256, height=128)  # the region masks are resized to any size
    run = interrupt_when(tier.server, heavy.graph, progress_of(heavy.sampler, at_least=2))
    assert run.trigger is not None and run.last == "execution_interrupted", [e["type"] for e in run.events]
    assert run.interrupted_node == heavy.sampler
    state = tier.model_state()
    assert hooks_left(state) == 0, state
    assert state == tier.state_before

    entry, again = tier.image(light)
    assert light.sampler not in cached_nodes(entry)
    equal = np.array_equal(before, again)
    record(tier, "regional sampling", run, heavy.sampler, "MixOfShowRegionalSampler", HEAVY_STEPS, state, equal)
    assert equal
