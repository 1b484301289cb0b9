"""The model-family profile (fusion/families) is the one home of everything family-specific: no other shipped
module holds a layer count, a width or a layer name, and the SD1.x profile describes SD1.5 exactly (checked
against the layer layout written out here from the UNet's published structure), and so does the SDXL profile."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from fusion.families import FAMILIES, SD15, SDXL, family_named, recognise_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [p for p in sorted((REPO / "fusion").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py"))
           + [REPO / "__init__.py", REPO / "mixofshow_run.py"] if "families" not in p.parts]
# SD1.x's and SDXL's layer counts and widths (SDXL: 70 layers, a 2048-wide context of CLIP-L 768 and bigG 1280,
# the 2816-wide global vector), and names of their layers (ldm, diffusers and kohya XTI spellings)
FAMILY_NUMBERS = {"16", "768", "70", "2048", "1280", "2816"}
LAYER_NAME = re.compile(r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)\.\d|"
                        r"\b(IN|OUT)\d\d\b|\bMID\b")


def code_tokens(path: Path):
    """(kind, text, line) of every token that is code, not a comment or a docstring."""
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        is_docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type not in (tokenize.COMMENT, tokenize.NL) and not is_docstring:
            yield tok.type, tok.string, tok.start[0]
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.type


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_family_literals_outside_the_profile(path):
    found = [f"{path.relative_to(REPO)}:{line}: {text}" for kind, text, line in code_tokens(path)
             if (kind == tokenize.NUMBER and text in FAMILY_NUMBERS)
             or (kind in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)) and LAYER_NAME.search(text))]
    assert not found, "family-specific literals outside fusion/families:\n" + "\n".join(found)


def test_the_sd15_profile():
    # SD1.5: one transformer block per SpatialTransformer at input blocks 1, 2, 4, 5, 7, 8, the middle block and
    # output blocks 3..11; CLIP-L 768 wide
    expected = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + \
               [("output", i, 0) for i in range(3, 12)]
    assert list(SD15.layers) == expected and SD15.layer_count == 16
    assert SD15.context_dim == SD15.text_width == 768 and [e.name for e in SD15.text_encoders] == ["clip_l"]
    assert [SD15.layer_of(k[:2], k[2]) for k in expected] == list(range(16))
    assert SD15.layer_of(("input", 3)) is None and SD15.layer_of(("input", 1), 1) is None
    assert SD15.layer_of_weight("diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight") == 15
    assert SD15.ldm_unet_module("up_blocks.1.attentions.0.proj_in") == "output_blocks.3.1.proj_in"
    assert SD15.describes_unet(768, 16) and not SD15.describes_unet(1024, 16) and not SD15.describes_unet(768, 70)
    assert SD15.describes_clip({"clip_l": 768}) and not SD15.describes_clip({"clip_l": 768, "clip_g": 1280})
    assert family_named("sd15") is SD15 and SD15 in FAMILIES


def test_the_sdxl_profile():
    # SDXL: transformer_depth [0, 0, 2, 2, 10, 10], middle 10, output [0, 0, 0, 2, 2, 2, 10, 10, 10] read backwards:
    # input blocks 4, 5 (2 blocks each), 7, 8 (10 each), the middle block (10), output blocks 0, 1, 2 (10 each) and
    # 3, 4, 5 (2 each) = 70 cross-attention layers; CLIP-L 768 and OpenCLIP-bigG 1280 make the 2048-wide context
    expected = [("input", i, j) for i in (4, 5) for j in range(2)] \
        + [("input", i, j) for i in (7, 8) for j in range(10)] + [("middle", 0, j) for j in range(10)] \
        + [("output", i, j) for i in (0, 1, 2) for j in range(10)] \
        + [("output", i, j) for i in (3, 4, 5) for j in range(2)]
    assert list(SDXL.layers) == expected and SDXL.layer_count == 70
    assert [SDXL.layer_of(k[:2], k[2]) for k in expected] == list(range(70))
    assert SDXL.layer_of(("input", 4), 2) is None and SDXL.layer_of(("input", 1), 0) is None
    assert SDXL.context_dim == 2048 == sum(e.width for e in SDXL.text_encoders)
    assert [(e.name, e.width, e.table_part, e.lora_part, e.comfy_lora_prefix, e.tokenizer_key)
            for e in SDXL.text_encoders] == [
        ("clip_l", 768, "new_concept_embedding", "text_encoder", "text_encoder.", "l"),
        ("clip_g", 1280, "new_concept_embedding_2", "text_encoder_2", "text_encoder_2.", "g")]
    # diffusers down block b attention a <-> input_blocks.{3b+a+1}.1; up block b attention a <-> output_blocks.{3b+a}.1
    assert SDXL.ldm_unet_module("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k") == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    assert SDXL.ldm_unet_module("up_blocks.1.attentions.2.proj_out") == "output_blocks.5.1.proj_out"
    assert SDXL.ldm_unet_module("mid_block.attentions.0.transformer_blocks.3.ff.net.2") == \
        "middle_block.1.transformer_blocks.3.ff.net.2"
    assert SDXL.layer_of_weight("diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_k.weight") == 69
    assert SDXL.layer_of_weight("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight") == 24
    assert SDXL.has_unet_module("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q")
    assert not SDXL.has_unet_module("down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q")
    assert not SDXL.has_unet_module("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert [t.channel_mult for t in SDXL.transformers] == [2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    # recognition: SDXL's model and CLIP; not the refiner (1280 context, bigG only), SD2.x (1024), SSD-1B-like
    # variants with fewer blocks
    assert SDXL.describes_unet(2048, 70) and not SDXL.describes_unet(1280, 32) and not SDXL.describes_unet(2048, 46)
    assert SDXL.describes_clip({"clip_l": 768, "clip_g": 1280}) and not SDXL.describes_clip({"clip_g": 1280})
    assert not any(f.describes_unet(1024, 16) or f.describes_clip({"clip_h": 1024}) for f in FAMILIES)
    assert family_named("sdxl") is SDXL and FAMILIES == (SD15, SDXL)
    assert SDXL.size_conditioning and not SD15.size_conditioning
    assert [e.kohya_prefix for e in SDXL.text_encoders] == ["lora_te1_", "lora_te2_"] and \
        SD15.text_encoders[0].kohya_prefix == "lora_te_"


def test_file_recognition_tells_the_families_apart():
    sd15_tables = {"new_concept_embedding": {"<a>": (16, 768)}}
    sdxl_tables = {"new_concept_embedding": {"<a>": (70, 768)}, "new_concept_embedding_2": {"<a>": (70, 1280)}}
    found, _ = recognise_file(sd15_tables, {"unet": {"down_blocks.0.attentions.0.proj_in": (4, 320, 1, 1)}})
    assert found == [SD15]
    found, markers = recognise_file(sdxl_tables, {
        "text_encoder_2": {"text_model.encoder.layers.31.self_attn.q_proj": (32, 1280)},
        "unet": {"up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k": (32, 2048)}})
    assert found == [SDXL] and "70-row token tables" in markers["sdxl"] and "a 'text_encoder_2' part" in \
        markers["sdxl"]
    # shared markers (a CLIP-L table part, modules both UNets have) tell nothing
    assert recognise_file({"new_concept_embedding": {"<a>": (24, 768)}}, {"unet": {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (4, 640)}})[0] == []
    # 70-row CLIP-L tables with an SD1.x cross-attention LoRA: two families
    found, markers = recognise_file({"new_concept_embedding": {"<a>": (70, 768)}}, {"unet": {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (4, 768)}})
    assert found == [SD15, SDXL] and any("768-wide context" in m for m in markers["sd15"])
