"""Issue 2 benchmarks, measured side by side in one run on the full-size random SD1.5:
1. encode cost: stock CLIP Text Encode vs the pack's encode without and with a concept token
   (and how many text-encoder passes / rows each makes);
2. sampling cost with layer-wise conditioning vs plain conditioning at 256x256 (target <= 1.05x).

``--sdxl`` (issue 19): the layer-wise encode on the full-size random SDXL's CLIP (CLIP-L + bigG, 70 layers; the
checkpoint of ``bash tools/host/make_models.sh --sdxl``, loaded without its UNet — run it under the big-model
lock) against the stock SDXL encoder, and what the shared encodes save: a 1-chunk prompt with one concept, a
2-chunk prompt with the concept in its second chunk and a concept whose rows repeat, each against encoding
every copy (``every_copy``), with the sequences each encoder ran. ``--sdxl --tiny``: the tiny SDXL's CLIP.

usage: .host/venv/bin/python benchmarks/bench_conditioning.py [--steps 3] [--repeats 3] [--size 256]
       .host/venv/bin/python benchmarks/bench_conditioning.py --sdxl [--tiny] [--quick] [--repeats 2] [--gpu]
"""
import argparse
import statistics
import time

import dev_paths  # isort: split

import comfy_env
import torch
from synthetic import make_edlora_state

REPO = dev_paths.REPO
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--sdxl", action="store_true", help="the SDXL encode benchmark (make_models.sh --sdxl)")
ap.add_argument("--tiny", action="store_true", help="with --sdxl: the test fixture's tiny SDXL CLIP")
ap.add_argument("--quick", action="store_true",
                help="with --sdxl: only the stock encoder, the 1-chunk concept prompt (70 sequences) and the 1-chunk "
                     "prompt whose rows repeat (7): the every-copy cases encode 280 more, minutes on a CPU")
ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU")
a = ap.parse_args()

env = comfy_env.env(cpu=not a.gpu)  # ComfyUI importable from here on
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

import nodes as comfy_nodes  # noqa: E402


def sdxl_encode() -> None:
    """The SDXL encode benchmark (module text)."""
    from synthetic import FULL_SDXL_TEXT, TINY_XL_SHAPES

    from fusion.families import SDXL

    if a.tiny:
        _, clip, _ = env.tiny_xl.build_all("narrow", 0)
        shapes = dict(TINY_XL_SHAPES)
    else:
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(REPO / ".host" / "models" / "sdxl_random_fp16.safetensors"), output_vae=False, output_model=False)
        shapes = dict(model_channels=320, text_sizes=FULL_SDXL_TEXT)
    edlora_of = env.pack("fusion.files.edlora").parse_edlora
    concepts_of = env.pack("fusion.prompts.concepts")
    lora_patch = env.pack("nodes.glue.lora_patch")
    distinct = edlora_of(make_edlora_state(("<b1>", "<b2>"), seed=3, family=SDXL, whole_block=False, **shapes),
                         "bench_xl.pth")
    repeated = make_edlora_state(("<r1>",), seed=4, family=SDXL, whole_block=False, unet_lora=False, **shapes)
    for part in ("new_concept_embedding", "new_concept_embedding_2"):  # 7 distinct rows, each for 10 layers
        repeated["params"][part] = {t: v[::10].repeat_interleave(10, 0) for t, v in repeated["params"][part].items()}
    repeated = edlora_of(repeated, "bench_xl_repeat.pth")
    lclip, concepts = clip.clone(), concepts_of.ConceptSet()
    for edlora in (distinct, repeated):
        lclip.add_patches(lora_patch.clip_patches(edlora, clip), 0.7)
        concepts = concepts.add(concepts_of.Concept(edlora, 0.7, 0.7))
    encode = env.pack("nodes.glue.layerwise").encode_with_concepts
    rows = {"clip_l": [], "clip_g": []}
    for name in rows:
        getattr(lclip.cond_stage_model, name).transformer.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: rows[name].append(kwargs["embeds"].shape[0]), with_kwargs=True)
    one_chunk = "a photo of a <b1> <b2> in a garden, detailed"
    two_chunks = "a photo of two friends in a garden, " + "very " * 70 + "detailed, <b1> <b2>"
    cases = {
        "stock SDXL encoder, no concept": lambda: comfy_nodes.CLIPTextEncode().encode(lclip, one_chunk.replace(
            "<b1> <b2>", "man")),
        "1 chunk, one concept (2 tokens)": lambda: encode(lclip, one_chunk, concepts),
        "  ... every copy encoded": lambda: encode(lclip, one_chunk, concepts, every_copy=True),
        "2 chunks, concept in the 2nd": lambda: encode(lclip, two_chunks, concepts),
        "  ... every copy encoded ": lambda: encode(lclip, two_chunks, concepts, every_copy=True),
        "1 chunk, rows repeat (7 distinct)": lambda: encode(lclip, "a photo of a <r1> in a garden", concepts),
        "  ... every copy encoded  ": lambda: encode(lclip, "a photo of a <r1> in a garden", concepts,
                                                    every_copy=True),
    }
    if a.quick:
        cases = {k: f for k, f in cases.items() if "1 chunk" in k or "stock" in k}
    cases["stock SDXL encoder, no concept"]()  # warm-up (model load)
    times: dict[str, list[float]] = {k: [] for k in cases}
    counted = {}
    for _ in range(a.repeats):
        for name, f in cases.items():
            rows["clip_l"].clear()
            rows["clip_g"].clear()
            t = time.perf_counter()
            f()
            comfy.model_management.soft_empty_cache()
            times[name].append(time.perf_counter() - t)
            counted[name] = (sum(rows["clip_l"]), sum(rows["clip_g"]), len(rows["clip_l"]))
    ref = statistics.median(times["stock SDXL encoder, no concept"])
    where = "GPU" if a.gpu else "CPU"
    print(f"## SDXL layer-wise encode ({'tiny' if a.tiny else 'full-size'} CLIP-L + bigG, 70 layers, {where}, "
          f"median of {a.repeats}, interleaved; spread = min-max)")
    print(f"{'case':36s} {'s':>8s} {'ratio':>7s} {'spread':>15s}  sequences CLIP-L / bigG (passes)")
    for name in cases:
        m = statistics.median(times[name])
        spread = f"{min(times[name]) / ref:.1f}-{max(times[name]) / ref:.1f}"
        n_l, n_g, passes = counted[name]
        print(f"{name:36s} {m:8.2f} {m / ref:7.2f} {spread:>15s}  {n_l} / {n_g} ({passes})")
    tokenize = env.pack("nodes.glue.layerwise").tokenize_with_concepts
    before = tokenize(lclip, one_chunk, concepts)[1]["l"][0][1]  # the first placeholder's position
    print(f"(the 1-chunk prompt's {before} tokens before its first concept token are the same in every copy and "
          f"recomputed: at most {100 * before / 77:.0f}% of its encode)")


if a.sdxl:
    sdxl_encode()
    raise SystemExit(0)

ckpt = REPO / ".host" / "models" / "sd15_random_fp16.safetensors"
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False)
torch.save(make_edlora_state(("<b1>", "<b2>"), seed=3), env.base / "models" / "edloras" / "bench.pth")
lmodel, lclip, concepts = env.pack("nodes.glue.loading").apply_edlora(
    model, clip, None, str(env.base / "models" / "edloras" / "bench.pth"), 0.7, 0.7)
encode = env.pack("nodes.glue.layerwise").encode_with_concepts

calls = []
transformer = lclip.cond_stage_model.clip_l.transformer
transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
    (args[0] if args and args[0] is not None else kwargs.get("embeds")).shape[0]), with_kwargs=True)

text_plain = "a photo of a man in a garden, detailed"
text_concept = "a photo of a <b1> <b2> in a garden, detailed"
cases = {
    "stock CLIPTextEncode (no concept)": lambda: comfy_nodes.CLIPTextEncode().encode(lclip, text_plain),
    "pack encode, no concept token": lambda: encode(lclip, text_plain, concepts),
    "pack encode, one concept (2 tokens)": lambda: encode(lclip, text_concept, concepts),
}
for f in cases.values():
    f()  # warm-up (model load)
times = {k: [] for k in cases}
passes = {}
for _ in range(5):
    for name, f in cases.items():
        calls.clear()
        t = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t)
        passes[name] = list(calls)
ref = statistics.median(times["stock CLIPTextEncode (no concept)"])
print("## Encode (full-size CLIP, CPU, median of 5, interleaved)")
print(f"{'case':40s} {'ms':>8s} {'ratio':>7s}  text-encoder passes (rows each)")
for name in cases:
    m = statistics.median(times[name])
    print(f"{name:40s} {m * 1000:8.1f} {m / ref:7.2f}  {len(passes[name])} {passes[name]}")

pos_layer = encode(lclip, text_concept, concepts)
pos_plain = comfy_nodes.CLIPTextEncode().encode(lclip, text_plain)[0]
neg = comfy_nodes.CLIPTextEncode().encode(lclip, "lowres")[0]
latent = torch.zeros(1, 4, a.size // 8, a.size // 8)
noise = comfy.sample.prepare_noise(latent, 0)


def run(pos):
    t = time.perf_counter()
    comfy.sample.sample(lmodel, noise, a.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)
    return time.perf_counter() - t


run(pos_plain)
run(pos_layer)
tp, tl = [], []
for _ in range(a.repeats):
    tp.append(run(pos_plain))
    tl.append(run(pos_layer))
mp, ml = statistics.median(tp), statistics.median(tl)
print(f"\n## Sampling, full-size SD1.5, {a.size}x{a.size}, {a.steps} euler steps, cfg 7, median of {a.repeats}")
print(f"plain conditioning      {mp:7.2f} s")
print(f"layer-wise conditioning {ml:7.2f} s   ratio {ml / mp:.3f} (target <= 1.05)")
