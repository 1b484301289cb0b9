"""Cancel: ``POST /interrupt`` while a Gradient Fusion samples its recordings and while a regional
sampling with a LoRA per region runs (seen on the websocket: a progress step of that node), then:
nothing is left on the tiny model (no forward hook or pre-hook on its UNet and CLIP modules, no patch
on its patchers: the fixture pack's ModelStateProbe), and a normal prompt gives exactly the image it
gave before the cancel."""
from __future__ import annotations

import numpy as np
import reliability_graphs as rg
from server_events import interrupt_when, progress_of, stage_text_of
from server_setup import cached_nodes

HEAVY_STEPS = 100  # far more than the interrupt lets run: each step is tens of ms on the tiny model


def hooks_left(state: dict) -> int:
    return sum(state[part][kind]
               for part in ("unet", "clip", "global") for kind in ("forward_hooks", "forward_pre_hooks"))


def record(tier, name: str, run, node: str, node_class: str, state: dict, equal: bool) -> None:
    """The cancel's figures: the node's progress bar when /interrupt was sent (and its stage text, if that
    was the trigger), where it stopped, how fast, and what was left."""
    upto = run.events[:run.events.index(run.trigger) + 1]
    bar = [e["data"] for e in upto if e["type"] == "progress" and str(e["data"].get("node")) == node]
    tier.figures.setdefault("cancel", {})[name] = {
        "interrupted_node": node_class, "step": int(bar[-1]["value"]) if bar else 0,
        "steps": int(bar[-1]["max"]) if bar else 0, "stage": run.trigger["data"].get("text"),
        "last_step": run.last_step(node), "seconds_to_interrupt": round(run.seconds_to_trigger, 2),
        "seconds_to_stop": round(run.seconds_to_stop, 3), "hooks_left": hooks_left(state),
        "state_unchanged": state == tier.state_before, "next_prompt_equal": equal}


def test_interrupt_during_fusion_leaves_nothing_behind(tier):
    """Interrupted in fusion's third stage (sampling each concept with forward pre-hooks on the UNet
    layers recording their inputs). The cancelled run leaves nothing in the disk cache (no entry, no
    half-written file); the same fusion prompt afterwards gives the image it gave before, and so does
    its cached variant."""
    names = ("cancel_a.pth", "cancel_b.pth")
    light = rg.fusion(3, cache=False, names=names, kind="cancel_fusion")
    _, before = tier.image(light)
    heavy = rg.fusion(3, cache=True, names=names, steps=HEAVY_STEPS, size=128, kind="cancel_fusion_heavy")
    entries_before = set(tier.fusion_cache.glob("*")) if tier.fusion_cache.exists() else set()
    # in stage 3, while the first concept samples with its recording hooks on the UNet
    run = interrupt_when(tier.server, heavy.graph, stage_text_of(heavy.fusion, "UNet: concept 1 of 2, step 2/"))
    assert run.trigger is not None and run.last == "execution_interrupted", [e["type"] for e in run.events]
    assert run.interrupted_node == heavy.fusion
    state = tier.model_state()
    assert hooks_left(state) == 0, state
    assert state == tier.state_before

    written = (set(tier.fusion_cache.glob("*")) if tier.fusion_cache.exists() else set()) - entries_before
    assert written == set(), written

    entry, again = tier.image(light)
    assert light.fusion not in cached_nodes(entry)
    cached_variant = rg.fusion(3, cache=True, names=names, kind="cancel_fusion")
    _, from_cache = tier.image(cached_variant)
    equal = np.array_equal(before, again) and np.array_equal(before, from_cache)
    record(tier, "fusion", run, heavy.fusion, "MixOfShowGradientFusion", state, equal)
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
    record(tier, "regional sampling", run, heavy.sampler, "MixOfShowRegionalSampler", state, equal)
    assert equal
