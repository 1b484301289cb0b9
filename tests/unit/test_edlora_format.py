"""fusion/edlora.py and fusion/concepts.py: file layouts, key spellings, XTI, conversion, bad files."""
import logging

import pytest
import torch
from family_layers import layer_of_unet_module
from safetensors.torch import save_file
from synthetic import make_edlora_state

from fusion.errors import MAX_MESSAGE_CHARS, ConceptError, EDLoRAError
from fusion.families import SD15
from fusion.files.edlora import (
    MAX_TOKEN_CHARS,
    convert_to_safetensors,
    load_edlora,
    parse_edlora,
    to_flat_state_dict,
    unique_output_path,
)
from fusion.files.filecheck import check_file_tensor, shown
from fusion.prompts.concepts import Concept, ConceptSet, substitute_concepts
from fusion.versions import BUNDLE_FORMAT

XTI_LAYER_KEYS = SD15.xti_keys
diffusers_unet_to_ldm = SD15.ldm_unet_module
SMALL = dict(model_channels=32, text_layers=2, text_intermediate=512)


def same(a, b):
    assert a.tokens == b.tokens
    for t in a.embeddings:
        assert torch.equal(a.embeddings[t], b.embeddings[t])
    for pa, pb in [(a.text[e], b.text[e]) for e in a.text] + [(a.unet, b.unet)]:
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
    assert len(a.unet) == 16 * 12 and len(a.text["clip_l"]) == 2 * 6
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
    with pytest.raises(EDLoRAError, match="partial.safetensors: not an ED-LoRA"):
        load_edlora(str(tmp_path / "partial.safetensors"))


UP = "unet.down_blocks.0.attentions.0.proj_in.lora_up.weight"
Q_DOWN = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight"


def refused(state, *pieces, name="bad.pth") -> str:
    """parse_edlora must refuse ``state`` naming the file, with every piece in a bounded message."""
    with pytest.raises(EDLoRAError) as info:
        parse_edlora(state, name)
    msg = str(info.value)
    assert msg.startswith(name + ": ") and len(msg) <= MAX_MESSAGE_CHARS, msg
    for piece in pieces:
        assert piece in msg, (piece, msg)
    return msg


def put(state, key, value):
    """Set a flat-spelled key (``part.rest``) inside a ``params``-wrapped state."""
    part, _, rest = key.partition(".")
    state["params"][part][rest] = value


@pytest.mark.parametrize("mutate, pieces", [
    (lambda s: put(s, "new_concept_embedding.<w>", torch.zeros(16, 1024)),
     ["'new_concept_embedding.<w>' is float32 [16, 1024]; an SD1.x ED-LoRA token table is [16, 768]", "SD2.x"]),
    (lambda s: put(s, "new_concept_embedding.<w>", torch.zeros(12, 768)), ["is float32 [12, 768]", "[16, 768]"]),
    (lambda s: put(s, "new_concept_embedding.no brackets", torch.zeros(16, 768)),
     ["concept token 'no brackets' must look like <name>"]),
    (lambda s: s["params"]["unet"].pop("down_blocks.0.attentions.0.proj_in.lora_up.weight"),
     ["'unet.down_blocks.0.attentions.0.proj_in' has only a lora down factor"]),
    (lambda s: s["params"]["unet"].update({"conv_in.lora_up.weight": torch.zeros(4, 1),
                                           "conv_in.lora_down.weight": torch.zeros(1, 4)}),
     ["'unet.conv_in' is not a transformer-block module"]),
    (lambda s: s["params"]["text_encoder"].update({"x.weight": torch.zeros(1)}),
     ["unexpected key 'text_encoder.x.weight'", "<module>.lora_up/lora_down.weight"]),
    (lambda s: s["params"]["unet"].update({"down_blocks.0.attentions.0.proj_in.alpha": torch.ones(())}),
     ["unexpected key 'unet.down_blocks.0.attentions.0.proj_in.alpha'"]),
    (lambda s: s["params"].update({"new_concept_embedding": {}}), ["defines no concept token"]),
])
def test_bad_contents_are_named(mutate, pieces):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    mutate(state)
    refused(state, *pieces)


@pytest.mark.parametrize("shape, pieces", [
    ((15, 768), ["is float32 [15, 768]; an SD1.x ED-LoRA token table is [16, 768]"]),
    ((16, 1024), ["is float32 [16, 1024]", "rows are for no text encoder this pack knows (SD2.x"]),
    ((0, 768), ["is float32 [0, 768]"]),
    ((16, 0, 768), ["is float32 [16, 0, 768]"]),
    ((16, 1, 1, 1, 768), ["is float32 [16, 1, 1, 1, 768]", "[16, n, 768] for n vectors"]),
    ((768,), ["is float32 [768]"]),
    ((16, 76, 768), ["has 76 vectors per layer; a prompt chunk holds at most 75"]),
])
def test_token_tables_must_be_16_by_768(shape, pieces):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    put(state, "new_concept_embedding.<t1>", torch.zeros(shape))
    refused(state, "bad.pth: 'new_concept_embedding.<t1>'", *pieces)
    put(state, "new_concept_embedding.<t1>", torch.zeros(16, 3, 768))
    assert parse_edlora(state, "ok.pth").embeddings["<t1>"].shape == (16, 3, 768)


@pytest.mark.parametrize("key, index, value, pieces", [
    ("new_concept_embedding.<c1>", (3, 5), float("nan"), ["(float32 [16, 768]) has 1 NaN and 0 infinite values"]),
    (UP, (0, 1, 0, 0), float("inf"),
     ["'unet.down_blocks.0.attentions.0.proj_in.lora_up.weight' (float32 [32, 4, 1, 1]) has 0 NaN and 1 infinite"]),
    (Q_DOWN, (2, 7), float("-inf"), ["q_proj.lora_down.weight' (float32 [4, 768]) has 0 NaN and 1 infinite"]),
])
def test_non_finite_tensors_are_refused_at_load(tmp_path, key, index, value, pieces):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    part, _, rest = key.partition(".")
    state["params"][part][rest][index] = value
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(EDLoRAError) as info:
        load_edlora(str(tmp_path / "nan.pth"))
    for piece in ["nan.pth: ", "only finite numbers", *pieces]:
        assert piece in str(info.value), str(info.value)


def test_float_dtypes_load_as_float32_and_others_are_refused(tmp_path, caplog):
    state = make_edlora_state(("<c1>", "<c2>"), seed=3, **SMALL)
    emb = state["params"]["new_concept_embedding"]
    half, bf16 = emb["<c1>"].half(), emb["<c2>"].bfloat16()
    emb["<c1>"], emb["<c2>"] = half, bf16
    up = state["params"]["unet"]["down_blocks.0.attentions.0.proj_in.lora_up.weight"].double()
    state["params"]["unet"]["down_blocks.0.attentions.0.proj_in.lora_up.weight"] = up
    torch.save(state, tmp_path / "mixed.pth")
    with caplog.at_level(logging.INFO, logger="mixofshow"):
        e = load_edlora(str(tmp_path / "mixed.pth"))
    assert torch.equal(e.embeddings["<c1>"][:, 0], half.float())
    assert torch.equal(e.embeddings["<c2>"][:, 0], bf16.float())
    assert torch.equal(e.unet["down_blocks.0.attentions.0.proj_in"][0], up.float())
    assert all(t.dtype == torch.float32 for t in e.embeddings.values())
    assert [r.getMessage() for r in caplog.records] == ["Mix-of-Show: mixed.pth: 1 float64 tensor converted to float32"]
    for dtype in (torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn):
        emb["<c1>"] = torch.zeros(16, 768, dtype=dtype)
        name = str(dtype).removeprefix("torch.")
        refused(state, f"'new_concept_embedding.<c1>' is {name} [16, 768]; ED-LoRA tensors are floating point")
    emb["<c1>"] = torch.full((16, 768), 1e300, dtype=torch.float64)
    refused(state, "has float64 values too large for float32")


@pytest.mark.parametrize("where, junk, pieces", [
    ("new_concept_embedding.<c1>", {"a": torch.zeros(1)}, ["is a dict of 1 entries; expected a tensor"]),
    ("new_concept_embedding.<c1>", [torch.zeros(16, 768)], ["is a list of 1 items; expected a tensor"]),
    ("new_concept_embedding.<c1>", None, ["'new_concept_embedding.<c1>' is None; expected a tensor"]),
    ("new_concept_embedding.<c1>", "text", ["is str 'text'; expected a tensor"]),
    ("new_concept_embedding.<c1>", torch.Size([16, 768]), ["is a Size of 2 items"]),
    (UP, 3, ["lora_up.weight' is int 3; expected a tensor"]),
    (UP, torch.zeros(32, 4, 1), ["lora_up.weight' is float32 [32, 4, 1]; expected 2-D or 4-D"]),
    (UP, torch.zeros(32, 4, 3, 3), ["proj_in' factors have incompatible shapes up [32, 4, 3, 3] @ down [4, 32, 1, 1]"]),
    (UP, torch.zeros(32, 5, 1, 1), ["incompatible shapes up [32, 5, 1, 1] @ down [4, 32, 1, 1]"]),
    (UP, torch.zeros(1).expand(32, 4, 1, 1), ["is float32 [32, 4, 1, 1] but its storage holds only 1 values"]),
])
def test_junk_where_a_tensor_belongs(where, junk, pieces):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    put(state, where, junk)
    refused(state, *pieces)


@pytest.mark.parametrize("mutate, pieces", [
    (lambda s: s["params"].update(unet=torch.zeros(3)), ["'unet' is a tensor float32 [3]; expected a dict of LoRA"]),
    (lambda s: s["params"].update(text_encoder=[1, 2]), ["'text_encoder' is a list of 2 items; expected a dict"]),
    (lambda s: s.update(params=[]), ["'params' is a list of 0 items; expected a dict holding"]),
    (lambda s: s["params"]["new_concept_embedding"].update({7: torch.zeros(16, 768)}),
     ["'new_concept_embedding' has the key 7; expected tokens like <name>"]),
    (lambda s: s["params"]["unet"].update({("a", "b"): torch.zeros(1)}), ["'unet' has the key ('a', 'b')"]),
    (lambda s: s["params"].update({"unet.down_blocks.0.attentions.0.proj_in.lora_up.weight": torch.zeros(1)}),
     ["'unet.down_blocks.0.attentions.0.proj_in.lora_up.weight' is given twice (nested and flat)"]),
    (lambda s: s["params"]["unet"].update({"down_blocks.0.attentions.0.proj_in_lora.up.weight": torch.zeros(1)}),
     ["'unet.down_blocks.0.attentions.0.proj_in' has its lora up factor twice (in both key spellings)"]),
    (lambda s: s["params"]["new_concept_embedding"].update({"<" + "x" * 5000 + ">": torch.zeros(16, 768)}),
     ["concept token '<xxxx", "at most 100 characters"]),
    (lambda s: s["params"]["unet"].update({"y" * 100_000: torch.zeros(1)}), ["unexpected key 'unet.yyyy"]),
])
def test_structural_errors_name_the_file_and_key_in_bounded_messages(mutate, pieces):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    mutate(state)
    refused(state, *pieces)


def test_entries_beside_the_parts_are_ignored_with_one_warning(tmp_path, caplog):
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    plain = parse_edlora(make_edlora_state(("<c1>",), seed=3, **SMALL), "plain.pth")
    state.update({"optimizer": {"state": {0: {}}, "param_groups": []}, "step": 1200, "epoch": 4,
                  "lr_scheduler": {}, "ema": {"decay": 0.99}, "global_step": 7})
    torch.save(state, tmp_path / "ckpt.pth")
    with caplog.at_level(logging.WARNING, logger="mixofshow"):
        e = load_edlora(str(tmp_path / "ckpt.pth"))
    same(e, plain)
    assert e.ignored_keys == ("'optimizer'", "'step'", "'epoch'", "'lr_scheduler'", "'ema'", "'global_step'")
    assert e.ignored_total == 6
    assert [r.getMessage() for r in caplog.records] == [
        "Mix-of-Show: ckpt.pth: ignored 6 entries that are not part of an ED-LoRA: 'optimizer', 'step', 'epoch', "
        "'lr_scheduler', 'ema' and 1 more (the rest was loaded)"]
    assert plain.ignored_keys == () and plain.ignored_summary == ""
    # flat files: keys of other prefixes are ignored the same way
    flat = to_flat_state_dict(plain)
    flat.update({"ema.unet.x": torch.zeros(1), "text_encoder_old": torch.zeros(1)})
    save_file(flat, str(tmp_path / "flat.safetensors"))
    e = load_edlora(str(tmp_path / "flat.safetensors"))
    same(e, plain)
    assert e.ignored_keys == ("'ema.unet.x'", "'text_encoder_old'")


@pytest.mark.parametrize("where, key", [("flat", 7), ("flat", True), ("nested", True), ("params", 3),
                                        ("nested", (1, 2)), ("flat", None)])
def test_keys_that_are_not_strings_are_refused(where, key):
    """A flat file names its tensors by strings; an int or a boolean key (True == 1) beside them, or beside the
    parts, is refused rather than guessed at (the hostile run's "flat dict with an integer key", "top-level
    boolean key")."""
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    if where == "flat":
        state = {f"{part}.{k}": v for part, d in state["params"].items() for k, v in d.items()}
        state[key] = torch.zeros(16, 768)
    elif where == "nested":
        state[key] = torch.zeros(1)
    else:
        state["params"][key] = "x"
    refused(state, f"has the key {key!r} ({type(key).__name__}) at the top level", "keys are strings")


def test_only_the_first_ignored_keys_are_kept():
    state = make_edlora_state(("<c1>",), seed=3, **SMALL)
    state.update({f"k{i}": i for i in range(1000)})
    e = parse_edlora(state, "many.pth")
    assert e.ignored_total == 1000 and len(e.ignored_keys) == 100 and e.ignored_keys[-1] == "'k99'"
    assert e.ignored_summary.endswith("'k0', 'k1', 'k2', 'k3', 'k4' and 995 more")


def test_check_file_tensor_contract():
    """The validator the bundle loader calls: what it returns and what it refuses."""
    half = torch.nn.Parameter(torch.randn(4, 8).half())
    out = check_file_tensor("b.safetensors", "model.w", half, ndim=2, float32=False)
    assert out.dtype == torch.float16 and not out.requires_grad and torch.equal(out, half.detach())
    out = check_file_tensor("b.safetensors", "model.w", half.double(), shapes=[(4, None)])
    assert out.dtype == torch.float32 and torch.equal(out, half.detach().float())
    with pytest.raises(EDLoRAError, match=r"^b\.safetensors: 'model\.w' is float16 \[4, 8\]; expected \[8, n\] "):
        check_file_tensor("b.safetensors", "model.w", half, shapes=[(8, None)])
    table = r"^b\.safetensors: 'model\.w' is float16 \[4, 8\]; the table is \[16, 768\]$"
    with pytest.raises(EDLoRAError, match=table):
        check_file_tensor("b.safetensors", "model.w", half, ndim=3, expected="the table is [16, 768]")
    with pytest.raises(EDLoRAError, match="is a sparse_coo tensor"):
        check_file_tensor("b.safetensors", "model.w", torch.eye(3).to_sparse())
    with pytest.raises(EDLoRAError, match=r"'model\.w' \(float16 \[4, 8\]\) has 1 NaN"):
        bad = half.detach().clone()
        bad[0, 0] = float("nan")
        check_file_tensor("b.safetensors", "model.w", bad, float32=False)
    key = "k" * 1000
    with pytest.raises(EDLoRAError) as info:
        check_file_tensor("b.safetensors", key, None)
    assert len(str(info.value)) < 200 and "'kkk" in str(info.value)


def test_shown_bounds_anything():
    t = (1,)
    for _ in range(60):
        t = (t, t)  # 2**60 leaves
    assert len(shown(t)) <= 120 and shown(t).startswith("((<tuple of 2>")
    assert shown("x" * 10_000).endswith("…") and len(shown("x" * 10_000)) <= 120
    assert shown("a\nb") == "'a\\nb'"  # control characters never reach a message raw
    assert shown(10 ** 10_000) == "<int of 33220 bits>"
    assert shown({"a": torch.zeros(2, 3)}) == "{'a': <tensor float32 [2, 3]>}"
    assert len(EDLoRAError("x" * 10_000).args[0]) == MAX_MESSAGE_CHARS


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
    with pytest.raises(EDLoRAError, match="list.pth: expected a dict of tensors, found a list of 1 items"):
        load_edlora(str(tmp_path / "list.pth"))
    save_file({"x": torch.zeros(3, dtype=torch.int32)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(EDLoRAError, match=r"ints\.safetensors: not an ED-LoRA .*top-level keys: 'x'\)"):
        load_edlora(str(tmp_path / "ints.safetensors"))


def make_bundle(path) -> None:
    save_file({"model.diffusion_model.x.weight": torch.zeros(2, 2), "new_concept_embedding.<b1>": torch.zeros(16, 768)},
              str(path), metadata={"format": BUNDLE_FORMAT, "version": "1"})


@pytest.mark.parametrize("name", ["fused.safetensors", "FUSED.SAFETENSORS", "fused.SafeTensors"])
def test_a_bundle_is_refused_by_the_converter_and_the_edlora_loader(tmp_path, name):
    make_bundle(tmp_path / name)
    with pytest.raises(EDLoRAError, match=f"^{name}: a fused ED-LoRA bundle is already a .safetensors; bundles are "
                                          f"not converted"):
        convert_to_safetensors(str(tmp_path / name), str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(EDLoRAError, match=f"^{name}: a fused ED-LoRA bundle .*never as an ED-LoRA"):
        load_edlora(str(tmp_path / name))


def test_convert_never_writes_over_its_source(tmp_path):
    torch.save(make_edlora_state(("<s1>",), seed=2, **SMALL), tmp_path / "s.pth")
    convert_to_safetensors(str(tmp_path / "s.pth"), str(tmp_path / "s.safetensors"))
    before = (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(EDLoRAError, match="would overwrite its own source"):
        convert_to_safetensors(str(tmp_path / "s.safetensors"), str(tmp_path / "s.safetensors"))
    assert (tmp_path / "s.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pth", "s.safetensors"]  # no .part left


def test_unique_output_path(tmp_path):
    folder = str(tmp_path)
    assert unique_output_path(folder, "hina") == str(tmp_path / "hina.safetensors")
    assert unique_output_path(folder, " ../../etc/hina.SAFETENSORS ") == str(tmp_path / "hina.safetensors")
    (tmp_path / "hina.safetensors").write_bytes(b"x")
    assert unique_output_path(folder, "hina") == str(tmp_path / "hina_00001.safetensors")
    assert unique_output_path(folder, "hina", overwrite=True) == str(tmp_path / "hina.safetensors")
    (tmp_path / "hina_00001.safetensors").write_bytes(b"x")
    (tmp_path / "hina_00007.safetensors").write_bytes(b"x")
    (tmp_path / "hinata_00009.safetensors").write_bytes(b"x")
    assert unique_output_path(folder, "hina.safetensors") == str(tmp_path / "hina_00008.safetensors")
    # the file being converted: a suffix without overwrite, refused with it
    src = str(tmp_path / "hina.safetensors")
    assert unique_output_path(folder, "hina", source=src) == str(tmp_path / "hina_00008.safetensors")
    with pytest.raises(EDLoRAError, match="hina.safetensors: the output would overwrite the file being converted"):
        unique_output_path(folder, "hina", overwrite=True, source=src)
    assert unique_output_path(folder, "other", overwrite=True, source=src) == str(tmp_path / "other.safetensors")
    for bad in ("", "  ", ".", "..", ".safetensors", "a\x00b", "x" * 300):
        with pytest.raises(EDLoRAError, match="is not a usable file name"):
            unique_output_path(folder, bad)


def test_xti_token_names_are_usable_or_refused_with_the_limit(tmp_path):
    """The token is the file's name: up to the token limit it works in a prompt; longer names are refused at load
    with the limit (they were cut, so the name a user types was not the token)."""
    rows = {k: torch.randn(1, 768) for k in XTI_LAYER_KEYS}
    longest = "s" * (MAX_TOKEN_CHARS - 2)
    save_file(rows, str(tmp_path / f"{longest}.safetensors"))
    e = load_edlora(str(tmp_path / f"{longest}.safetensors"))
    assert e.tokens == [f"<{longest}>"]
    concepts = ConceptSet().add(Concept(e, 1.0, 1.0))
    assert substitute_concepts(f"a photo in <{longest}> style", concepts.tables, "sks").vectors == \
        ((f"<{longest}>", 0),)
    too_long = "t" * (MAX_TOKEN_CHARS - 1)
    save_file(rows, str(tmp_path / f"{too_long}.safetensors"))
    with pytest.raises(EDLoRAError, match=rf"^{too_long[:40]}.*: an XTI embedding's token is its file name, "
                                          rf"<{too_long[:20]}.*>, which is {MAX_TOKEN_CHARS - 1} characters long; "
                                          rf"rename the file to at most {MAX_TOKEN_CHARS - 2} characters"):
        load_edlora(str(tmp_path / f"{too_long}.safetensors"))


def test_xti_validation(tmp_path, caplog):
    rows = {k: torch.randn(2, 768) for k in XTI_LAYER_KEYS}
    # 17 keys: which is the embedding? kohya writes exactly the 16 layers
    for extra in ("IN00", "string_to_token"):
        save_file({**rows, extra: torch.randn(2, 768)}, str(tmp_path / "seventeen.safetensors"))
        with pytest.raises(EDLoRAError, match=rf"^seventeen\.safetensors: an XTI embedding has exactly the 16 layer "
                                              rf"keys IN01 … OUT11; this file also has '{extra}'"):
            load_edlora(str(tmp_path / "seventeen.safetensors"))
    bad = dict(rows, OUT05=torch.randn(3, 768))
    save_file(bad, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(EDLoRAError, match=r"^mixed\.safetensors: XTI layers must all have one shape \[n, 768\]; "
                                          r"found \[2, 768\], \[3, 768\]$"):
        load_edlora(str(tmp_path / "mixed.safetensors"))
    nan = dict(rows)
    nan["MID"] = rows["MID"].clone()
    nan["MID"][1, 2] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(EDLoRAError, match=r"^nan\.safetensors: 'MID' \(float32 \[2, 768\]\) has 1 NaN"):
        load_edlora(str(tmp_path / "nan.safetensors"))
    save_file(dict(rows, IN01=torch.randn(2, 1024)), str(tmp_path / "wide.safetensors"))
    with pytest.raises(EDLoRAError, match=r"'IN01' is float32 \[2, 1024\]; an SD1.x XTI layer is \[n, 768\]"):
        load_edlora(str(tmp_path / "wide.safetensors"))
    save_file({k: v for k, v in rows.items() if k != "OUT11"}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(EDLoRAError, match=r"not an ED-LoRA .*15 of the 16 XTI layer keys \(missing OUT11\)"):
        load_edlora(str(tmp_path / "partial.safetensors"))


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
