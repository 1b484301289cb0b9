"""ED-LoRA training's pure parts (fusion/train) against straightforward implementations written here: the masked
denoising loss (a loop over samples and pixels), the attention with captured maps and the attention regulariser
(attention probabilities computed head by head, layer by layer), the linear learning-rate decay (torch's LambdaLR),
the norm stop rule, the augmentation (its random draws replayed by hand), captions, the epoch order, presets and
tokens, the LoRA modules and factors."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fusion.errors import TrainingError
from fusion.families import SD15
from fusion.train import dataset as ds
from fusion.train.objectives import LayerMaps, attention_regulariser, attention_with_maps, masked_denoising_loss
from fusion.train.schedule import EmbeddingStop, linear_lr, mean_row_norm
from fusion.train.settings import (
    PRESETS,
    Initialiser,
    initial_rows,
    lora_factors,
    parse_concept_tokens,
    parse_initialisers,
    resolve_settings,
    size_conditioning,
    text_lora_modules,
    unet_lora_modules,
)

G = torch.Generator().manual_seed(0)


# ---- losses

def test_masked_denoising_loss_is_the_channel_sum_of_masked_means():
    pred, target = torch.randn(3, 4, 5, 6, generator=G), torch.randn(3, 4, 5, 6, generator=G)
    mask = torch.rand(3, 5, 6, generator=G)
    per_sample = []
    for b in range(3):
        total = 0.0
        for c in range(4):
            num = sum(float((pred[b, c, i, j] - target[b, c, i, j]) ** 2 * mask[b, i, j])
                      for i in range(5) for j in range(6))
            total += num / float(mask[b].sum())
        per_sample.append(total)
    expected = sum(per_sample) / 3
    assert math.isclose(float(masked_denoising_loss(pred, target, mask)), expected, rel_tol=1e-5)
    ones = torch.ones(3, 5, 6)   # a full mask: 4x the plain mean squared error
    assert math.isclose(float(masked_denoising_loss(pred, target, ones)),
                        4 * float(((pred - target) ** 2).mean()), rel_tol=1e-5)


def _probabilities(q, k, heads):
    """softmax(q kᵀ/√d) head by head: [B, H, N, T]."""
    b, n, width = q.shape
    d = width // heads
    out = torch.empty(b, heads, n, k.shape[1])
    for i in range(b):
        for h in range(heads):
            s = q[i, :, h * d:(h + 1) * d] @ k[i, :, h * d:(h + 1) * d].T / math.sqrt(d)
            out[i, h] = torch.softmax(s, dim=-1)
    return out


def test_attention_with_maps_equals_head_by_head_attention():
    heads, d = 3, 4
    q, k, v = (torch.randn(2, n, heads * d, generator=G) for n in (10, 7, 7))
    columns = torch.tensor([[1, 2], [4, 0]])
    out, maps = attention_with_maps(q, k, v, heads, columns)
    probs = _probabilities(q, k, heads)
    expected = torch.empty_like(q)
    for i in range(2):
        for h in range(heads):
            expected[i, :, h * d:(h + 1) * d] = probs[i, h] @ v[i, :, h * d:(h + 1) * d]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for i in range(2):
        for p in range(2):
            torch.testing.assert_close(maps[i, :, p], probs[i, :, :, columns[i, p]].sum(dim=0), atol=1e-6, rtol=1e-6)


def _nearest(mask, h, w):
    """Nearest-neighbour resize as torch's 'nearest' mode defines it: source index floor(dst * in / out)."""
    b, hi, wi = mask.shape
    out = torch.empty(b, h, w)
    for y in range(h):
        for x in range(w):
            out[:, y, x] = mask[:, int(math.floor(y * hi / h)), int(math.floor(x * wi / w))]
    return out


def _brute_regulariser(layers, mask, full_identity, weight):
    """From per-layer probabilities [B, H, N, P]: every (layer, head) of a size averaged, each position's map
    divided by its global max, the reference's formula."""
    sizes = {}
    for probs, h, w in layers:
        sizes.setdefault((h, w), []).extend(probs[:, head] for head in range(probs.shape[1]))
    total = 0.0
    for (h, w), maps in sizes.items():
        mean = sum(maps) / len(maps)                       # [B, N, P]
        mean = mean.reshape(mean.shape[0], h, w, -1)
        g = _nearest(mask, h, w)
        terms = []
        for p in range(mean.shape[-1]):
            a = mean[..., p] / mean[..., p].max()
            terms.append(a)
        subject = terms[-1]
        outside = [(b, y, x) for b in range(g.shape[0]) for y in range(h) for x in range(w) if g[b, y, x] == 0]
        if full_identity:
            total += float(((subject - g) ** 2).mean())
        else:
            total += sum(float(subject[i]) for i in outside) / len(outside)
        if len(terms) > 1:
            total += sum(float(terms[0][i]) for i in outside) / len(outside)
    return weight * total


@pytest.mark.parametrize("full_identity", [False, True])
def test_attention_regulariser_equals_the_formula_on_brute_force_maps(full_identity):
    heads_of = {(8, 8): 2, (4, 4): 4}
    layers, captured = [], []
    for (h, w), count in (((8, 8), 2), ((4, 4), 3)):
        heads = heads_of[(h, w)]
        for _ in range(count):
            q = torch.randn(2, h * w, heads * 4, generator=G)
            k = torch.randn(2, 6, heads * 4, generator=G)
            columns = torch.tensor([[1, 2], [3, 4]])
            _out, maps = attention_with_maps(q, k, k, heads, columns)
            captured.append(LayerMaps(maps, heads, h, w))
            probs = _probabilities(q, k, heads)
            layers.append((torch.stack([probs[b, :, :, columns[b]] for b in range(2)]), h, w))
    mask = torch.zeros(2, 16, 16)
    mask[0, 4:12, 2:9] = 1.0
    mask[1, 0:7, 7:16] = 0.5
    got = attention_regulariser(captured, mask, full_identity, 0.01)
    assert math.isclose(float(got), _brute_regulariser(layers, mask, full_identity, 0.01), rel_tol=1e-5)


def test_attention_regulariser_with_one_token_uses_the_subject_only_and_is_skipped_for_a_full_mask():
    q, k = torch.randn(1, 16, 8, generator=G), torch.randn(1, 5, 8, generator=G)
    _out, maps = attention_with_maps(q, k, k, 2, torch.tensor([[3]]))
    mask = torch.zeros(1, 8, 8)
    mask[0, :4] = 1
    probs = _probabilities(q, k, 2)[:, :, :, [3]]
    assert math.isclose(float(attention_regulariser([LayerMaps(maps, 2, 4, 4)], mask, False, 1.0)),
                        _brute_regulariser([(probs, 4, 4)], mask, False, 1.0), rel_tol=1e-5)
    assert attention_regulariser([LayerMaps(maps, 2, 4, 4)], torch.ones(1, 8, 8), False, 1.0) is None


# ---- schedule and stop rule

def test_linear_decay_equals_lambda_lr_stepped_once_per_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    total = 7
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    for step in range(total):
        assert math.isclose(linear_lr(1e-3, step, total), optimizer.param_groups[0]["lr"], rel_tol=1e-12)
        optimizer.step()
        scheduler.step()
    assert linear_lr(1e-3, 0, total) == 1e-3 and linear_lr(1e-3, total, total) == 0


def test_norm_stop_rule_per_encoder_and_shared():
    rows = torch.randn(2, 16, 1, 8, generator=G)
    norms = [float(rows[token, layer, 0].norm()) for token in range(2) for layer in range(16)]
    assert math.isclose(mean_row_norm(rows), sum(norms) / 32, rel_tol=1e-6)
    stop = EmbeddingStop([0.5, 1.5])
    assert stop.update([0.4, 1.0]) == ([], [])
    assert stop.update([0.6, 1.0]) == ([0], []) and stop.stopped == [True, False]
    assert stop.update([0.7, 1.2]) == ([], [])          # a stopped encoder stays stopped
    assert stop.update([0.7, 1.6]) == ([1], []) and stop.stopped == [True, True]
    shared = EmbeddingStop([0.5, 1.5], shared=True)
    assert shared.update([0.6, 1.0]) == ([0], [1]) and shared.stopped == [True, True]
    zero = EmbeddingStop([0.0])
    assert zero.update([0.01]) == ([0], [])              # threshold 0: stops after the first step


# ---- training set, augmentation, captions, order

def _example(h, w, mask=True):
    image = torch.rand(3, h, w, generator=G)
    m = torch.zeros(h, w)
    m[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1
    return ds.TrainingExample(image, m if mask else None, "a <TOK>")


def _resize(x, h, w):
    return torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


def _replay(example, size, crop_p, seed):
    """The augmentation written out step by step with the same random draws."""
    rng = random.Random(seed)
    layers = torch.cat([example.image, example.mask[None]])
    h, w = layers.shape[1:]
    s = size / min(h, w)
    h, w = max(size, round(h * s)), max(size, round(w * s))
    layers = _resize(layers, h, w) if (h, w) != tuple(example.image.shape[1:]) else layers
    if rng.random() < crop_p and h > w:
        layers = layers[:, :rng.randint(w, h)]
    else:
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
        layers = layers[:, top:top + size, left:left + size]
    h, w = layers.shape[1:]
    if max(h, w) > size:
        h2, w2 = round(h * size / max(h, w)), round(w * size / max(h, w))
        layers, h, w = _resize(layers, h2, w2), h2, w2
    top, left = rng.randint(0, size - h), rng.randint(0, size - w)
    pixels = torch.zeros(3, size, size)
    pixels[:, top:top + h, left:left + w] = layers[:3]
    subject, placed = torch.zeros(size, size), torch.zeros(size, size)
    subject[top:top + h, left:left + w] = layers[3]
    placed[top:top + h, left:left + w] = 1
    return pixels, subject, placed


@pytest.mark.parametrize("shape,crop_p,seed", [((96, 64), 1.0, 0), ((96, 64), 0.0, 1), ((64, 96), 1.0, 2),
                                               ((40, 40), 0.5, 3), ((200, 120), 1.0, 4)])
def test_augmentation_replays_the_rule(shape, crop_p, seed):
    example = _example(*shape)
    got = ds.augment(example, 32, crop_p, 8, random.Random(seed))
    pixels, subject, placed = _replay(example, 32, crop_p, seed)
    torch.testing.assert_close(got.pixels, pixels.clamp(0, 1), atol=1e-6, rtol=0)
    down = torch.nn.functional.interpolate(torch.stack([subject, placed])[None], size=(4, 4), mode="bilinear",
                                           align_corners=False)[0]
    torch.testing.assert_close(got.subject_mask, down[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.image_mask, down[1], atol=1e-6, rtol=0)
    if shape == (96, 64) and crop_p == 1.0:   # a portrait kept its top part, pasted narrower than the canvas
        assert placed[:, 0].sum() == 0 or placed[:, -1].sum() == 0


def test_captions_and_templates():
    rng = random.Random(5)
    got = ds.build_caption("  <TOK>  in a hat,  smiling , outdoors,at night", "<a1> <a2>", 1, "human", rng)
    rng = random.Random(5)
    rest = ["smiling", "outdoors", "at night"]
    rng.shuffle(rest)
    expected = rng.choice(ds.TEMPLATES["human"]).format(", ".join(["<a1> <a2> in a hat", *rest]))
    assert got == expected
    assert ds.build_caption("<TOK>, x", "<b>", 5, "none", random.Random(0)) == "<b>, x"
    assert all("{}" in t for kind in ds.TEMPLATES.values() for t in kind)


def test_example_order_is_epochs_of_every_example_repeats_times():
    order = ds.ExampleOrder(3, 4, random.Random(0))
    first_epoch = [i for _ in range(4) for i in order.batch(3)]   # 12 draws = one epoch
    assert sorted(first_epoch) == sorted([0, 1, 2] * 4)
    order = ds.ExampleOrder(3, 3, random.Random(0))
    [order.batch(2) for _ in range(4)]                            # 8 of 9 drawn; the 9th is dropped
    assert len(order._epoch) == 1
    order.batch(2)
    assert len(order._epoch) == 7
    assert ds.steps_for(17, 500, 2, 2) == 2125


def test_training_set_refusals_name_the_image():
    img = torch.rand(8, 10, 3)
    with pytest.raises(TrainingError, match="no images"):
        ds.make_training_set([])
    with pytest.raises(TrainingError, match=r"mask of image 2 is 9x8; the image is 10x8"):
        ds.make_training_set([img, img], [torch.ones(8, 10), torch.ones(8, 9)])
    with pytest.raises(TrainingError, match="mask of image 1 is empty"):
        ds.make_training_set([img], [torch.zeros(8, 10)])
    with pytest.raises(TrainingError, match="1 masks for 2 images"):
        ds.make_training_set([img, img], [torch.ones(8, 10)])
    with pytest.raises(TrainingError, match=r"caption of image 1 .* has no <TOK>"):
        ds.make_training_set([img], captions=["a dog"])
    made = ds.make_training_set([img], captions=[""])
    assert made.examples[0].caption == "<TOK>" and not made.has_masks


# ---- settings, tokens, modules, factors

def test_presets_resolve_with_overrides_and_refuse_bad_values():
    s = resolve_settings("auto", SD15, {"lr_unet": 2e-4, "rank_te": None})
    assert s.preset == "MoS SD1.5 real" and s.lr_unet == 2e-4 and s.encoders[0].rank_te == 4
    assert (s.encoders[0].lr_emb, s.encoders[0].lr_te, s.batch_size, s.grad_accum, s.repeats, s.use_mask_loss) == \
        (1e-3, 1e-5, 2, 2, 500, True)
    anime = resolve_settings("MoS SD1.5 anime", SD15, {})
    assert not anime.use_mask_loss and anime.encoders == s.encoders
    with pytest.raises(TrainingError, match="preset 'CC SDXL' is for SDXL models; the connected MODEL is SD1.x"):
        resolve_settings("CC SDXL", SD15, {})
    with pytest.raises(TrainingError, match="batch_size must be at least 1"):
        resolve_settings("auto", SD15, {"batch_size": 0})
    with pytest.raises(TrainingError, match="lr_te must be a finite number"):
        resolve_settings("auto", SD15, {"lr_te": float("nan")})
    cc = PRESETS["CC SDXL"].values
    assert (cc["lr_emb_g"], cc["lr_te_g"], cc["rank_te_g"], cc["rank_unet"], cc["emb_norm_threshold_g"]) == \
        (5e-4, 2e-6, 32, 32, 1.5)


def test_concept_and_initialiser_tokens():
    assert parse_concept_tokens("<a1>+<a2>") == parse_concept_tokens(" <a1> <a2> ") == ("<a1>", "<a2>")
    for bad, message in (("", "empty"), ("a1", "must look like <name>"), ("<a1>+<a1>", "given twice")):
        with pytest.raises(TrainingError, match=message):
            parse_concept_tokens(bad)
    inits = parse_initialisers("<rand-0.013>+man", ("<a>", "<b>"))
    assert inits == (Initialiser(sigma=0.013), Initialiser(word="man"))
    assert parse_initialisers("", ("<a>",)) == (Initialiser(sigma=0.017),)
    assert parse_initialisers("<rand>", ("<a>",)) == (Initialiser(sigma=0.017),)
    with pytest.raises(TrainingError, match="1 initialiser .* for 2 concept tokens"):
        parse_initialisers("man", ("<a>", "<b>"))
    with pytest.raises(TrainingError, match="neither <rand-σ> nor one class word"):
        parse_initialisers("young man", ("<a>",))
    g = torch.Generator().manual_seed(1)
    rows = initial_rows(Initialiser(sigma=0.5), 16, 8, None, g)
    assert rows.shape == (16, 1, 8) and all(torch.equal(rows[0], r) for r in rows)
    word = torch.arange(8.0)
    assert torch.equal(initial_rows(Initialiser(word="man"), 16, 8, word, g)[5, 0], word)


def test_lora_modules_and_factors():
    assert len(unet_lora_modules(SD15, "attention")) == 128 and len(unet_lora_modules(SD15, "transformer")) == 192
    assert len(text_lora_modules(12, "attention")) == 48 and len(text_lora_modules(12, "attention+mlp")) == 72
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k" in unet_lora_modules(SD15, "attention")
    assert "down_blocks.0.attentions.0.proj_in" in unet_lora_modules(SD15, "transformer")
    up, down = lora_factors((320, 768), 4, torch.Generator().manual_seed(0))
    assert up.shape == (320, 4) and not up.any() and down.shape == (4, 768)
    assert float(down.abs().max()) <= 1 / math.sqrt(768) and float(down.abs().max()) > 0.9 / math.sqrt(768)
    up, down = lora_factors((320, 320, 1, 1), 4, torch.Generator().manual_seed(0))
    assert up.shape == (320, 4, 1, 1) and down.shape == (4, 320, 1, 1)
    with pytest.raises(TrainingError, match="1x1-conv"):
        lora_factors((320, 320, 3, 3), 4, torch.Generator())


def test_size_conditioning_and_its_reference_defect():
    assert size_conditioning(1024, False) == {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                                              "target_width": 1024, "target_height": 1024}
    quirk = size_conditioning(1024, True)   # the time ids (32, W, 0, 0, 32, W)
    assert (quirk["height"], quirk["width"], quirk["crop_h"], quirk["crop_w"], quirk["target_height"],
            quirk["target_width"]) == (32, 1024, 0, 0, 32, 1024)
