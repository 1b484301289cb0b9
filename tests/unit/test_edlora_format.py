"""fusion/edlora.py and fusion/concepts.py: file layouts, key spellings, XTI, conversion, bad files."""
import os

import pytest
import torch
from safetensors.torch import save_file

from fusion.concepts import Concept, ConceptError, ConceptSet, substitute_concepts
from fusion.edlora import (EDLoRAError, convert_to_safetensors, load_edlora, parse_edlora, save_edlora,
                           to_flat_state_dict)
from fusion.layers import XTI_LAYER_KEYS, diffusers_unet_to_ldm, layer_of_unet_module
from fusion.synthetic import make_edlora_state

SMALL = dict(model_channels=32, text_layers=2, text_intermediate=512)


def same(a, b):
    assert a.tokens == b.tokens
    for t in a.embeddings:
        assert torch.equal(a.embeddings[t], b.embeddings[t])
    for part in ("text_encoder", "unet"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k][0], pb[k][0]) and torch.equal(pa[k][1], pb[k][1])


@pytest.mark.parametrize("wrap", [True, False])
def test_both_key_spellings_with_and_without_params_read_the_same(tmp_path, wrap):
    main = make_edlora_state(("<a1>", "<a2>"), seed=1, spelling="main", wrap_params=wrap, **SMALL)
    research = make_edlora_state(("<a1>", "<a2>"), seed=1, spelling="research", wrap_params=wrap, **SMALL)
    assert "text_model.encoder.layers.0.self_attn.q_proj_lora.down.weight" in \
        (research["params"] if wrap else research)["text_encoder"]
    torch.save(main, tmp_path / "main.pth")
    torch.save(research, tmp_path / "research.pth")
    a, b = load_edlora(str(tmp_path / "main.pth")), load_edlora(str(tmp_path / "research.pth"))
    same(a, b)
    assert a.embeddings["<a1>"].shape == (16, 1, 768)
    assert len(a.unet) == 16 * 12 and len(a.text_encoder) == 2 * 6
    assert a.unet["down_blocks.0.attentions.0.proj_in"][0].shape == (32, 4, 1, 1)
    assert len(a.digest) == 64 and a.digest != b.digest


def test_flat_safetensors_round_trip_and_convert(tmp_path):
    torch.save(make_edlora_state(("<b1>",), seed=2, **SMALL), tmp_path / "b.pth")
    converted = convert_to_safetensors(str(tmp_path / "b.pth"), str(tmp_path / "b.safetensors"))
    again = load_edlora(str(tmp_path / "b.safetensors"))
    same(converted, again)
    flat = to_flat_state_dict(again)
    assert flat["new_concept_embedding.<b1>"].shape == (16, 768)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight" in flat
    torch.save(flat, tmp_path / "flat.pth")  # the flat names inside a .pth load as well
    same(again, load_edlora(str(tmp_path / "flat.pth")))


def test_xti_file_becomes_one_multi_vector_token(tmp_path):
    rows = {k: torch.randn(2, 768) for k in XTI_LAYER_KEYS}
    save_file(rows, str(tmp_path / "my style.safetensors"))
    e = load_edlora(str(tmp_path / "my style.safetensors"))
    assert e.tokens == ["<my_style>"] and e.embeddings["<my_style>"].shape == (16, 2, 768)
    torch.testing.assert_close(e.embeddings["<my_style>"][7], rows["OUT03"])
    save_file({k: v for k, v in list(rows.items())[:15]}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(EDLoRAError, match="not an ED-LoRA"):
        load_edlora(str(tmp_path / "partial.safetensors"))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["params"]["new_concept_embedding"].update({"<w>": torch.zeros(16, 1024)}), "1024 wide"),
    (lambda s: s["params"]["new_concept_embedding"].update({"<w>": torch.zeros(12, 768)}), r"\[16, 768\]"),
    (lambda s: s["params"]["new_concept_embedding"].update({"no brackets": torch.zeros(16, 768)}), "<name>"),
    (lambda s: s["params"]["unet"].pop("down_blocks.0.attentions.0.proj_in.lora_up.weight"), "only a lora down"),
    (lambda s: s["params"]["unet"].update({"conv_in.lora_up.weight": torch.zeros(4, 1),
                                           "conv_in.lora_down.weight": torch.zeros(1, 4)}), "not a transformer"),
    (lambda s: s["params"]["text_encoder"].update({"x.weight": torch.zeros(1)}), "unexpected key"),
    (lambda s: s["params"].update({"new_concept_embedding": {}}), "defines no concept token"),
])
def test_bad_contents_are_named(mutate, message):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    mutate(state)
    with pytest.raises(EDLoRAError, match=message):
        parse_edlora(state, "bad.pth")


def test_wide_text_encoder_lora_is_refused_as_another_base():
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    te = state["params"]["text_encoder"]
    te["text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight"] = torch.zeros(4, 1024)
    with pytest.raises(EDLoRAError, match="768-wide"):
        parse_edlora(state, "sd2.pth")


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(EDLoRAError, match="junk.safetensors: not a readable safetensors"):
        load_edlora(str(tmp_path / "junk.safetensors"))
    with pytest.raises(EDLoRAError, match="file not found"):
        load_edlora(str(tmp_path / "missing.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(EDLoRAError, match="expected a dict"):
        load_edlora(str(tmp_path / "list.pth"))


def test_concept_sets_collisions_and_substitution():
    a = parse_edlora(make_edlora_state(("<p1>", "<p2>"), seed=4, **SMALL), "potter.pth")
    b = parse_edlora(make_edlora_state(("<p2>",), seed=5, **SMALL), "other.pth")
    s = ConceptSet().add(Concept(a, 0.7, 0.7))
    with pytest.raises(ConceptError, match="<p2>.*potter.pth.*other.pth"):
        s.add(Concept(b, 1, 1))
    sub = substitute_concepts("(a <p1> <p2>:1.2), <p1>", s.tables, "sks")
    assert sub.text.count("sks") == 3 and sub.vectors == (("<p1>", 0), ("<p2>", 0), ("<p1>", 0))
    with pytest.raises(ConceptError, match="<nobody>"):
        substitute_concepts("a <nobody>", s.tables, "sks")
    assert substitute_concepts("a cat", s.tables, "sks").vectors == ()


def test_layer_tables():
    assert diffusers_unet_to_ldm("down_blocks.2.attentions.1.proj_in") == "input_blocks.8.1.proj_in"
    assert diffusers_unet_to_ldm("mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "middle_block.1.transformer_blocks.0.attn2.to_k"
    assert diffusers_unet_to_ldm("up_blocks.3.attentions.2.proj_out") == "output_blocks.11.1.proj_out"
    with pytest.raises(KeyError):
        diffusers_unet_to_ldm("up_blocks.0.attentions.0.proj_out")  # SD1's up_blocks.0 has no attention
    assert [layer_of_unet_module(f"up_blocks.{b}.attentions.{a}.proj_in") for b in (1, 2, 3) for a in range(3)] == \
        list(range(7, 16))
