"""The model-family profile (fusion/families) is the one home of everything family-specific: no other shipped
module holds a layer count, a width or a layer name, and the SD1.x profile describes SD1.5 exactly (checked
against the layer layout written out here from the UNet's published structure)."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from fusion.families import FAMILIES, SD15, family_named

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [p for p in sorted((REPO / "fusion").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py"))
           + [REPO / "__init__.py", REPO / "mixofshow_run.py"] if "families" not in p.parts]
# SD1.x's layer count and width, and names of its layers (ldm, diffusers and kohya XTI spellings)
FAMILY_NUMBERS = {"16", "768"}
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
