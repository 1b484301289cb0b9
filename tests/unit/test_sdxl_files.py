"""SDXL ED-LoRA files (Concept Conductor's format, docs/design.md §13.2): reading, the flat layout, the family a
file is recognised as, and every refusal naming the file and both families."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import FULL_SDXL_TEXT, make_edlora_state

from fusion.errors import EDLoRAError, ModelFamilyError
from fusion.families import SD15, SDXL
from fusion.files.edlora import convert_to_safetensors, load_edlora, parse_edlora, to_flat_state_dict

TINY = dict(model_channels=32, text_layers=3, whole_block=False)


def cc_state(tokens=("<c_1>", "<c_2>"), seed=0, **kw):
    """What Concept Conductor's SDXL trainer saves: {'params': {five parts}}, bf16 tables, fp32 LoRA, no alpha."""
    state = make_edlora_state(tokens, seed=seed, family=SDXL, **{**TINY, **kw})
    for part in ("new_concept_embedding", "new_concept_embedding_2"):
        state["params"][part] = {t: v.to(torch.bfloat16) for t, v in state["params"][part].items()}
    return state


def test_a_concept_conductor_pth_loads_as_sdxl(tmp_path):
    state = cc_state()
    torch.save(state, tmp_path / "mitsuha.pth")
    e = load_edlora(str(tmp_path / "mitsuha.pth"))
    assert e.family is SDXL and e.tokens == ["<c_1>", "<c_2>"]
    for encoder, part, width in (("clip_l", "new_concept_embedding", 768), ("clip_g", "new_concept_embedding_2", 1280)):
        for tok in e.tokens:
            table = e.tables[encoder][tok]
            assert table.shape == (70, 1, width) and table.dtype == torch.float32
            assert torch.equal(table[:, 0], state["params"][part][tok].float())
    assert len(e.text["clip_l"]) == 3 * 4 and len(e.text["clip_g"]) == 3 * 4 and len(e.unet) == 70 * 8
    up, down = e.unet["up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k"]
    assert down.shape == (4, 2048) and up.shape == (128, 4)
    assert e.warnings == () and e.ignored_total == 0
    # empty text parts (a trainer that found no attention module to put a LoRA on) load
    state["params"]["text_encoder"], state["params"]["text_encoder_2"] = {}, {}
    e = parse_edlora(state, "empty_te.pth")
    assert e.family is SDXL and e.text == {"clip_l": {}, "clip_g": {}}


def test_the_full_size_sdxl_layout_loads():
    """Concept Conductor's default placement on the full-size shapes: 48 CLIP-L, 128 bigG and 560 UNet modules."""
    e = parse_edlora(make_edlora_state(("<c_1>",), family=SDXL, model_channels=320, whole_block=False,
                                       text_sizes=FULL_SDXL_TEXT), "full.pth")
    assert (len(e.text["clip_l"]), len(e.text["clip_g"]), len(e.unet)) == (48, 128, 560)
    assert e.unet["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"][1].shape == (4, 640)
    assert e.unet["mid_block.attentions.0.transformer_blocks.9.attn2.to_v"][1].shape == (4, 2048)


def test_the_flat_layout_round_trip(tmp_path):
    torch.save(cc_state(seed=1), tmp_path / "cc.pth")
    converted = convert_to_safetensors(str(tmp_path / "cc.pth"), str(tmp_path / "cc.safetensors"))
    with safe_open(str(tmp_path / "cc.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["base"], meta["layers"], meta["tokens"]) == ("mixofshow-edlora", "sdxl", "70",
                                                                             "<c_1> <c_2>")
    flat = load_file(str(tmp_path / "cc.safetensors"))
    assert flat["new_concept_embedding_2.<c_1>"].shape == (70, 1280) and flat["new_concept_embedding.<c_2>"].shape \
        == (70, 768)
    assert "text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj.lora_down.weight" in flat
    again = load_edlora(str(tmp_path / "cc.safetensors"))
    assert again.family is SDXL and again.tokens == converted.tokens
    for enc in ("clip_l", "clip_g"):
        for tok in again.tokens:
            assert torch.equal(again.tables[enc][tok], converted.tables[enc][tok])
        assert again.text[enc].keys() == converted.text[enc].keys()
    assert to_flat_state_dict(again).keys() == flat.keys()
    # metadata that contradicts the content is refused
    save_file(flat, str(tmp_path / "liar.safetensors"), metadata={**meta, "base": "sd15"})
    with pytest.raises(ModelFamilyError, match=r"liar\.safetensors: its metadata says base='sd15', but its content "
                                               r"is an SDXL ED-LoRA"):
        load_edlora(str(tmp_path / "liar.safetensors"))


def _params(state):
    return state["params"]


def _sd15_to_k(state):
    _params(state)["unet"] = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight":
                              torch.zeros(4, 768),
                              "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight":
                              torch.zeros(64, 4)}


def _drop_clip_l_tables(state):
    _params(state)["new_concept_embedding"] = {}


@pytest.mark.parametrize("mutate, pieces", [
    # 70-row tables with a cross-attention LoRA reading SD1.x's 768-wide context
    (_sd15_to_k, ["inconsistent ED-LoRA", "(SD1.x)", "(SDXL)", "768-wide context", "70-row token tables"]),
    # bigG tables without CLIP-L tables, and different tokens in the two tables
    (_drop_clip_l_tables, ["inconsistent tables: <c_1> has no 'new_concept_embedding' table", "SDXL"]),
    (lambda s: _params(s)["new_concept_embedding"].update({"<c_3>": torch.zeros(70, 768)}),
     ["inconsistent tables: <c_3> has no 'new_concept_embedding_2' table (clip_g rows)", "SDXL"]),
    # a bigG table of another width
    (lambda s: _params(s)["new_concept_embedding_2"].update({"<c_1>": torch.zeros(70, 1024)}),
     ["'new_concept_embedding_2.<c_1>' is float32 [70, 1024]", "SDXL ED-LoRA token table (new_concept_embedding_2) "
      "is [70, 1280]", "SD2.x"]),
    (lambda s: _params(s)["new_concept_embedding_2"].update({"<c_1>": torch.zeros(70, 768)}),
     ["[70, 768]", "is [70, 1280]", "768-wide rows are for SD1.x or SDXL"]),
])
def test_inconsistent_sdxl_files_are_refused(mutate, pieces):
    state = cc_state()
    mutate(state)
    with pytest.raises(ModelFamilyError) as info:
        parse_edlora(state, "bad.pth")
    msg = str(info.value)
    assert msg.startswith("bad.pth: "), msg
    for piece in pieces:
        assert piece in msg, (piece, msg)


def test_files_for_no_family_or_two_are_refused_naming_both():
    state = make_edlora_state(("<a>",), seed=2, model_channels=32, text_layers=2, text_intermediate=512)
    _params(state)["new_concept_embedding"]["<a>"] = torch.zeros(24, 768)
    _params(state).pop("unet")
    with pytest.raises(ModelFamilyError, match=r"odd\.pth: an ED-LoRA for no model family this pack knows: its token "
                                               r"tables are \[24, 768\]; the tables of each family are SD1\.x: "
                                               r"\[16, 768\]; SDXL: \[70, 768\] and \[70, 1280\]"):
        parse_edlora(state, "odd.pth")
    state = make_edlora_state(("<a>",), seed=2, model_channels=32, text_layers=2, text_intermediate=512)
    _params(state)["text_encoder_2"] = {}
    with pytest.raises(ModelFamilyError, match=r"mixed\.pth: inconsistent ED-LoRA .*16-row token tables.*\(SD1\.x\).*"
                                               r"'text_encoder_2' part \(SDXL\)"):
        parse_edlora(state, "mixed.pth")


def test_untrained_bigg_tables_load_with_a_warning(caplog):
    """Concept Conductor's trainer can leave the bigG rows as 70 unrelated random rows while the CLIP-L rows (one
    initial vector per token, then trained) stay related: the file loads and says so."""
    g = torch.Generator().manual_seed(4)
    state = cc_state(("<c_1>", "<c_2>"))
    for tok in ("<c_1>", "<c_2>"):
        _params(state)["new_concept_embedding"][tok] = torch.randn(768, generator=g) + 0.1 * torch.randn(70, 768,
                                                                                                       generator=g)
    _params(state)["new_concept_embedding_2"]["<c_2>"] = torch.randn(1280, generator=g) + 0.1 * torch.randn(
        70, 1280, generator=g)
    with caplog.at_level("WARNING", logger="mixofshow"):
        e = parse_edlora(state, "cc_untrained.pth")
    assert e.family is SDXL and len(e.warnings) == 1
    warning = e.warnings[0]
    for piece in ("cc_untrained.pth", "clip_g", "'new_concept_embedding_2'", "<c_1>", "look untrained",
                  "used as they are"):
        assert piece in warning, (piece, warning)
    assert "<c_2>" not in warning and warning in caplog.text
    # random per-layer rows in both tables (nothing to compare against) and SD1.x files never warn
    assert parse_edlora(cc_state(), "random.pth").warnings == ()
    assert parse_edlora(make_edlora_state(("<a>",), model_channels=32, text_layers=2, text_intermediate=512),
                        "sd15.pth").warnings == ()


def test_sd15_files_are_still_sd15():
    e = parse_edlora(make_edlora_state(("<a>",), model_channels=32, text_layers=2, text_intermediate=512), "x.pth")
    assert e.family is SD15 and list(e.tables) == ["clip_l"] and e.embeddings["<a>"].shape == (16, 1, 768)
    with pytest.raises(EDLoRAError, match="an SD1.x ED-LoRA has no 'new_concept_embedding_2' part|inconsistent"):
        state = make_edlora_state(("<a>",), model_channels=32, text_layers=2, text_intermediate=512)
        _params(state)["new_concept_embedding_2"] = {}
        parse_edlora(state, "x.pth")


def test_the_streamed_checkpoint_writer_writes_what_safetensors_reads(tmp_path):
    """tools/host/make_sdxl_random.py writes the 6.5 GiB checkpoint tensor by tensor; its writer, on small tensors."""
    import make_sdxl_random

    g = torch.Generator().manual_seed(0)
    values = {"b.weight": torch.randn(3, 5, generator=g).half(), "a.ids": torch.arange(7)[None],
              "c.scale": torch.tensor(2.5), "d.empty": torch.zeros(0, 4)}
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in values.items()}
    made = []

    def make(key, shape, dtype):
        made.append(key)
        return values[key]

    make_sdxl_random.write_streamed(str(tmp_path / "x.safetensors"), meta, make, {"note": "test"})
    assert made == sorted(values)  # one at a time, in key order
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == values.keys() and all(torch.equal(loaded[k], v) for k, v in values.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "test"}
    assert not (tmp_path / "x.safetensors.part").exists()
