"""Issue #10 §4: every bad file is refused with a clear, bounded EDLoRAError before anything runs.

Real hostile files are built here (hand-written pickles inside torch.save archives, hand-written zip
archives, safetensors headers), never mocks of torch.load. The last test generates mutated files
from a seed and checks that each one loads correctly or is refused naming the file (``-s`` prints
the statistics per mutation kind).
"""
import collections
import json
import os
import pickle
import random
import struct
import subprocess
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from synthetic import make_edlora_state

from fusion.errors import MAX_MESSAGE_CHARS, EDLoRAError
from fusion.families import SD15
from fusion.files import filecheck
from fusion.files.edlora import TOKEN_PATTERN, EDLoRA, load_edlora, parse_edlora, save_edlora

XTI_LAYER_KEYS = SD15.xti_keys

TINY = dict(model_channels=8, text_layers=1, text_intermediate=16, whole_block=False, rank=2)


# ------------------------------------------------------------------------------------------ helpers

def refused(path, *pieces) -> str:
    """Load ``path``; it must be refused with an EDLoRAError naming the file and holding every piece."""
    with pytest.raises(EDLoRAError) as info:
        load_edlora(str(path))
    msg = str(info.value)
    assert msg.startswith(Path(path).name + ":"), msg
    assert len(msg) <= MAX_MESSAGE_CHARS, len(msg)
    for piece in pieces:
        assert piece in msg, (piece, msg)
    return msg


def members_of(path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def torch_archive(path, pkl: bytes) -> Path:
    """A torch.save archive (real layout: version, byteorder, ...) whose data.pkl is ``pkl``."""
    torch.save({"x": torch.zeros(1)}, path)
    items = members_of(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info, pkl if info.filename.endswith("/data.pkl") else data)
    return Path(path)


def write_zip(path, members) -> None:
    """A zip written by hand: ``members`` are (name, bytes as stored, method, crc32, unpacked size),
    so a member can carry a ready-made deflate stream."""
    out, central = bytearray(), bytearray()
    for name, raw, method, crc, size in members:
        n = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(raw), size, len(n),
                               0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(raw), size, len(n), 0) + n + raw
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    Path(path).write_bytes(bytes(out + central + eocd))


def deep_shared_key(depth: int) -> bytes:
    """{t: 2} with t = (t', t'), t' = (t'', t''), ...: ~30 bytes per level, 2**depth leaves."""
    return b"\x80\x02}K\x01" + b"q\x00h\x00\x86" * depth + b"K\x02s."


# ------------------------------------------------------------------------------------- pickles

def test_code_running_pickle_is_refused_as_such_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"params": {"new_concept_embedding": {"<x1>": Evil()}}}, tmp_path / "evil.pth")
    msg = refused(tmp_path / "evil.pth", "refused — this .pth needs code to load (it imports 'posix.system')",
                  "torch.load(weights_only=True)", "nothing in it was run")
    assert "truncated or corrupt" not in msg
    assert not marker.exists()


class CallsCode:
    """Pickles to a call of ``function`` (as a hostile file's author writes one)."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("function, args, imports", [
    (os.system, ("touch pwned",), {0: f"{os.system.__module__}.system", 4: f"{os.system.__module__}.system"}),
    (exec, ("import os",), {0: "__builtin__.exec", 4: "builtins.exec"}),  # protocols < 3 use Python 2's names
    (subprocess.call, (["touch", "pwned"],), {0: "commands.call", 4: "subprocess.call"}),
])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_pickle_that_would_run_code_is_named_as_such(tmp_path, protocol, function, args, imports, suffix):
    path = tmp_path / f"hostile{suffix}"
    path.write_bytes(pickle.dumps({"params": {"x": CallsCode(function, *args)}}, protocol=protocol))
    name = imports[0 if protocol < 3 else 4]
    msg = refused(path, f"hostile{suffix}: a plain pickle (not a torch.save archive), refused unread: loading it "
                        f"could run code (it imports '{name}'); nothing in it was run",
                  "convert it to .safetensors where you trust it")
    assert "truncated or corrupt" not in msg
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("pkl, pieces", [
    # what torch's weights-only unpickler answers "Unsupported operand N" to, named by opcode
    (b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93.", ["needs code to load", "STACK_GLOBAL"]),
    (b"\x80\x02(ios\nsystem\nX\x04\x00\x00\x00true\x85.", ["needs code to load", "opcode INST"]),
    (pickle.dumps({"a": 1}, protocol=4), ["needs more than plain tensors", "opcode FRAME"]),
    # a torch class that is not a tensor: "Unsupported global"
    (b"\x80\x02ctorch.nn.modules.linear\nLinear\n)R.", ["needs code to load", "torch.nn.modules.linear.Linear"]),
])
def test_refusal_wordings_of_the_weights_only_unpickler(tmp_path, pkl, pieces):
    msg = refused(torch_archive(tmp_path / "refuse.pth", pkl), "refused", "nothing in it was run", *pieces)
    assert "truncated or corrupt" not in msg


@pytest.mark.parametrize("kind, pkl", [
    ("IndexError", b"\x80\x02s."),                                         # SETITEM on an empty stack
    ("KeyError", b"\x80\x02h\x05."),                                       # memo entry 5 never stored
    ("UnicodeDecodeError", b"\x80\x02X\x02\x00\x00\x00\xff\xfe."),         # not UTF-8
    ("struct.error", b"\x80\x02J\x01"),                                    # a 4-byte int cut after 1
    ("TypeError", b"\x80\x02}]K\x01s."),                                   # a list as a dict key
    ("AttributeError", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00K\x01\x85K\x01\x85\x89"
                       b"ccollections\nOrderedDict\n)RtR."),                # an int where a storage belongs
    ("OverflowError", b"\x80\x02cbuiltins\ncomplex\n\x8a\xff" + b"\xff" * 254 + b"\x7f\x85R."),
    ("EOFError", b"\x80\x02}"),                                            # no STOP
])
def test_unpickler_errors_are_unreadable_file_errors(tmp_path, kind, pkl):
    refused(torch_archive(tmp_path / "broken.pth", pkl), "broken.pth: truncated or corrupt .pth file", f"({kind}")


def test_a_byte_that_is_no_opcode_is_corrupt_not_refused(tmp_path):
    refused(torch_archive(tmp_path / "flip.pth", b"\x80\x02\xff."),
            "truncated or corrupt .pth file (byte 255 in its pickle is not a pickle opcode)")


def test_deeply_shared_tuple_key_gives_a_short_message(tmp_path):
    """The issue's 491-byte file made a 10 MB message: a key whose halves are the same tuple, 20 deep."""
    small = torch_archive(tmp_path / "shared18.pth", deep_shared_key(18))
    msg = refused(small, "has the key ((<tuple of 2>, <tuple of 2>)")
    assert len(msg) < 200
    big = torch_archive(tmp_path / "shared40.pth", deep_shared_key(40))
    assert big.stat().st_size < 1200  # hashing this key in torch.load would take days
    refused(big, "refused — the .pth's pickle builds a tuple nested 19 deep with 1048575 items counting repeats",
            "nothing in it was run")


def test_deep_nesting_never_reaches_the_unpickler(tmp_path):
    # a tuple key a million deep crashes CPython (recursive hash) inside torch.load
    refused(torch_archive(tmp_path / "deep.pth", b"\x80\x02}K\x01" + b"\x85" * 1_000_000 + b"K\x02s."),
            "builds a tuple nested 65 deep")
    many = b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 250_000 + b"N" + b"s" * 250_000 + b"."
    refused(torch_archive(tmp_path / "dicts.pth", many), "more than 200000 dicts, lists and tuples")
    nested = b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 50_000 + b"N" + b"s" * 50_000 + b"."
    refused(torch_archive(tmp_path / "nested.pth", nested), "nested.pth: not an ED-LoRA", "top-level keys: 'a'")


def test_bytearray_allocation_is_refused_before_loading(tmp_path):
    # bytearray(2**33) would zero 8 GB: torch's weights-only unpickler allows the call
    pkl = b"\x80\x02cbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\x00\x02\x85R."
    refused(torch_archive(tmp_path / "alloc.pth", pkl), "refused — the .pth's pickle calls bytearray()")


def test_legacy_plain_pickle_and_empty_files(tmp_path):
    torch.save({"x": torch.zeros(4)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    refused(tmp_path / "legacy.pth", "a legacy .pth (torch.save before PyTorch 1.6)", "convert it to .safetensors")
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    msg = refused(tmp_path / "plain.pth", "a plain pickle (not a torch.save archive), refused unread",
                  "convert it to .safetensors where you trust it")
    assert "truncated or corrupt" not in msg and "run code" not in msg  # it imports nothing
    (tmp_path / "cut.pth").write_bytes(pickle.dumps({"x": 1}, protocol=2)[:-3])
    refused(tmp_path / "cut.pth", "not a readable .pth file — truncated or corrupt", "starts like a plain pickle")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "the file is empty (0 bytes)")
    torch.save(make_edlora_state(("<r1>",), seed=1, **TINY), tmp_path / "r.pth")
    save_edlora(load_edlora(str(tmp_path / "r.pth")), str(tmp_path / "renamed.pth"))
    refused(tmp_path / "renamed.pth", "it looks like a .safetensors file: rename it")
    (tmp_path / "text.pth").write_bytes(b"hello")
    refused(tmp_path / "text.pth", "not a readable .pth file", "does not start like a torch.save zip archive")


# ------------------------------------------------------------------------------------- archives

def test_deflate_bomb_is_refused_before_inflating(tmp_path):
    """~1 MB that inflates to a 1 GiB tensor, in a torch.save layout torch.load would read."""
    numel = 1 << 28  # float32: 1 GiB
    torch.save({"new_concept_embedding": {"<b1>": torch.zeros(12345)}}, tmp_path / "bomb.pth")
    chunk = bytes(1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH)  # self-contained: repeats decode to 1 MB each
    stream = block * 1024 + z.flush()
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(chunk, crc)
    members = []
    for info, data in members_of(tmp_path / "bomb.pth"):
        if info.filename.endswith("/data.pkl"):
            data = data.replace(b"J" + struct.pack("<i", 12345), b"J" + struct.pack("<i", numel))
        if info.filename.endswith("/data/0"):
            members.append((info.filename, stream, zipfile.ZIP_DEFLATED, crc, numel * 4))
        else:
            members.append((info.filename, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    write_zip(tmp_path / "bomb.pth", members)
    assert (tmp_path / "bomb.pth").stat().st_size < 1_200_000
    with zipfile.ZipFile(tmp_path / "bomb.pth") as zf, zf.open("bomb/data/0") as f:
        assert f.read(3 << 20) == bytes(3 << 20)  # a real deflate stream of zeros
    refused(tmp_path / "bomb.pth", "archive member 'bomb/data/0' inflates", f"to {numel * 4} (more than 20x)",
            "refused as a zip bomb")


def test_a_deflated_archive_within_the_bounds_loads(tmp_path, monkeypatch):
    state = make_edlora_state(("<d1>",), seed=3, **TINY)
    torch.save(state, tmp_path / "d.pth")
    items = members_of(tmp_path / "d.pth")
    with zipfile.ZipFile(tmp_path / "d.pth", "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in items:
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    e = load_edlora(str(tmp_path / "d.pth"))
    assert torch.equal(e.embeddings["<d1>"][:, 0], state["params"]["new_concept_embedding"]["<d1>"])
    monkeypatch.setattr(filecheck, "MAX_UNCOMPRESSED_BYTES", 10_000)
    refused(tmp_path / "d.pth", "the .pth archive unpacks to", "an ED-LoRA is a few hundred MB at most")


def test_archive_directory_lies_are_refused(tmp_path):
    torch.save(make_edlora_state(("<z1>",), seed=4, **TINY), tmp_path / "z.pth")
    data = bytearray((tmp_path / "z.pth").read_bytes())
    # torch.save writes a zip64 end record: claim a million members there
    at = data.rfind(b"PK\x06\x06")
    many = bytearray(data)
    many[at + 24:at + 40] = struct.pack("<QQ", 1_000_000, 1_000_000)  # entries on this disk, in all
    eocd = many.rfind(b"PK\x05\x06")
    many[eocd + 8:eocd + 12] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    (tmp_path / "many.pth").write_bytes(bytes(many))
    refused(tmp_path / "many.pth", "lists 1000000 members in a", "-byte directory (limit 65536 members)")
    # a stored member that claims to unpack to more than it stores
    cd = data.find(b"PK\x01\x02")
    lie = bytearray(data)
    lie[cd + 24:cd + 28] = struct.pack("<L", 10 ** 9)
    (tmp_path / "lie.pth").write_bytes(bytes(lie))
    refused(tmp_path / "lie.pth", "is stored uncompressed but lists", "1000000000 unpacked")
    # a compression method torch.save never uses (bzip2)
    other = bytearray(data)
    other[cd + 10:cd + 12] = struct.pack("<H", zipfile.ZIP_BZIP2)
    (tmp_path / "bz.pth").write_bytes(bytes(other))
    refused(tmp_path / "bz.pth", "uses zip compression method 12")
    (tmp_path / "cut.pth").write_bytes(bytes(data[: len(data) // 2]))
    refused(tmp_path / "cut.pth", "cut.pth: truncated or corrupt .pth file")


@pytest.mark.parametrize("second", ["r/data.pkl", "other/data.pkl"])
def test_an_archive_with_two_pickles_is_refused(tmp_path, second):
    """Which data.pkl would torch.load read? Neither: torch.save writes one, and each member once."""
    torch.save(make_edlora_state(("<t1>",), seed=5, **TINY), tmp_path / "r.pth")
    items = members_of(tmp_path / "r.pth")
    other = pickle.dumps({"new_concept_embedding": {}}, protocol=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(tmp_path / "two.pth", "w", zipfile.ZIP_STORED) as z:
            for info, data in items:
                z.writestr(info, data)
            z.writestr(second, other)
    what = "holds 2 members named 'r/data.pkl'" if second == "r/data.pkl" else "holds 2 pickles (data.pkl)"
    refused(tmp_path / "two.pth", f"two.pth: the .pth archive {what}", "torch.save writes one", "nothing in it was run")


def test_oversized_files_are_refused_unread(tmp_path):
    with open(tmp_path / "huge.safetensors", "wb") as f:
        f.truncate(5 << 30)  # sparse: costs no disk
    refused(tmp_path / "huge.safetensors", "5.0 GiB is more than any ED-LoRA", "limit is 4 GiB")


# ---------------------------------------------------------------------------------- safetensors

def raw_safetensors(path, header, data=b"") -> Path:
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)
    return Path(path)


@pytest.mark.parametrize("header, data, pieces", [
    ({"a": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 4]}}, bytes(4), ["overflow"]),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2 ** 40]}}, bytes(4), ["invalid shape"]),
    ({"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), ["unknown variant"]),
    ({"__metadata__": {"format": 3}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     ["expected a string"]),
])
def test_bad_safetensors_headers(tmp_path, header, data, pieces):
    msg = refused(raw_safetensors(tmp_path / "hdr.safetensors", header, data), "not a readable safetensors file",
                  *pieces)
    assert len(msg) < 250


def test_safetensors_header_longer_than_the_file(tmp_path):
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    refused(tmp_path / "long.safetensors", f"its header claims {2 ** 60} bytes but the file has 10")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    refused(tmp_path / "short.safetensors", "2 bytes is too short for a safetensors file")


# ------------------------------------------------------------------------------ absurd but finite

def _first(part: dict, suffix: str) -> str:
    return next(k for k in part if k.endswith(suffix))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
@pytest.mark.parametrize("case, value", [("table", 1e38), ("table", 3e38), ("unet_up", 1e30), ("text_up", 1e20),
                                         ("unet_down", -2e4)])
def test_finite_values_no_trained_file_has_are_refused(tmp_path, ext, case, value):
    """The hostile run's files: finite, so the finiteness check passed them, and NaN/Inf latents once applied.
    The bound (filecheck.MAX_ABS_VALUE, 10,000) is what the README states."""
    assert filecheck.MAX_ABS_VALUE == 1e4
    state = make_edlora_state(("<v1>",), seed=8, **TINY)
    params = state["params"]
    if case == "table":
        key = "new_concept_embedding.<v1>"
        params["new_concept_embedding"]["<v1>"][5, 7] = value
    else:
        part = params["text_encoder" if case == "text_up" else "unet"]
        module = _first(part, ".lora_up.weight" if case.endswith("up") else ".lora_down.weight")
        part[module].view(-1)[3] = value
        key = f"{'text_encoder' if case == 'text_up' else 'unet'}.{module}"
    path = tmp_path / f"absurd{ext}"
    if ext == ".pth":
        torch.save(state, path)
    else:
        safetensors_of(state, path)
    refused(path, f"absurd{ext}: {key!r} holds a value of {value:.3g}", "beyond ±10000, the bound")


def safetensors_of(state: dict, path) -> None:
    """The flat layout written directly (save_edlora would refuse the state first)."""
    flat = {f"{part}.{k}": v.contiguous() for part, d in state["params"].items() for k, v in d.items()}
    save_file(flat, str(path), metadata={"format": "mixofshow-edlora", "version": "1"})


def test_factors_whose_product_is_absurd_are_refused(tmp_path):
    """Each value within the bound, but up·down changes the weight by up to 5e3·5e3·r: refused naming the module."""
    state = make_edlora_state(("<p1>",), seed=9, **TINY)
    unet = state["params"]["unet"]
    module = _first(unet, ".lora_up.weight")[: -len(".lora_up.weight")]
    unet[module + ".lora_up.weight"].fill_(5e3)
    unet[module + ".lora_down.weight"].fill_(5e3)
    torch.save(state, tmp_path / "product.pth")
    refused(tmp_path / "product.pth", f"product.pth: 'unet.{module}': its factors can change a weight by up to",
            "beyond ±10000, the bound")
    unet[module + ".lora_up.weight"].fill_(1.0)  # large for a LoRA, but within the bound: loads
    unet[module + ".lora_down.weight"].fill_(1.0)
    torch.save(state, tmp_path / "large.pth")
    assert load_edlora(str(tmp_path / "large.pth")).unet


# ------------------------------------------------------------------------------------------- fuzz

DTYPES = (torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float16,
          torch.bfloat16, torch.float64)


def check_valid(e: EDLoRA) -> None:
    """What 'loaded correctly' means: usable tokens, finite float32 tables and factors of usable shapes."""
    assert isinstance(e, EDLoRA) and e.tokens
    for tok, t in e.embeddings.items():
        assert TOKEN_PATTERN.fullmatch(tok)
        assert t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 16 and t.shape[2] == 768
        assert 1 <= t.shape[1] <= 75 and torch.isfinite(t).all()
    for factors in (*e.text.values(), e.unet):
        for up, down in factors.values():
            assert up.dtype == down.dtype == torch.float32 and up.ndim == down.ndim in (2, 4)
            assert up.shape[1] == down.shape[0] and torch.isfinite(up).all() and torch.isfinite(down).all()


def base_files(rng: random.Random) -> list[tuple[str, dict]]:
    """(extension, state) of the valid files that get mutated: nested .pth, flat .safetensors, XTI."""
    nested = make_edlora_state(("<f1>", "<f2>"), seed=rng.randrange(1000), **TINY)
    flat = {}
    for part, d in nested["params"].items():
        for k, v in d.items():
            flat[f"{part}.{k}"] = v
    xti = {k: torch.randn(2, 768) * 0.02 for k in XTI_LAYER_KEYS}
    return [(".pth", nested), (".safetensors", flat), (".safetensors", xti), (".pth", dict(xti))]


def tensor_slots(state: dict) -> list[tuple[dict, str]]:
    """(container, key) of every tensor in a (nested or flat) state."""
    out = []
    for d in (state, *[v for v in state.values() if isinstance(v, dict)]):
        for k, v in list(d.items()):
            if isinstance(v, dict):
                out += [(v, kk) for kk, vv in v.items() if torch.is_tensor(vv)]
            elif torch.is_tensor(v):
                out.append((d, k))
    return out


def copy_state(state: dict) -> dict:
    return {k: (copy_state(v) if isinstance(v, dict) else v) for k, v in state.items()}


def mutate(kind: str, ext: str, state: dict, rng: random.Random, path: Path):
    """Write one mutated file; returns what must happen: 'refused', 'loaded' or 'either', and a check."""
    state = copy_state(state)
    slots = tensor_slots(state)
    box, key = rng.choice(slots)
    if kind in ("truncate", "bitflip", "pickle_flip"):
        write(state, ext, path)
        data = bytearray(path.read_bytes())
        if kind == "truncate":
            path.write_bytes(bytes(data[: rng.randrange(len(data))]))
            return "refused", None
        if kind == "bitflip":
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            return "either", None
        items = members_of(path)  # pickle bytes flipped, archive rewritten with the right CRCs
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for info, member in items:
                if info.filename.endswith("/data.pkl"):
                    member = bytearray(member)
                    for _ in range(rng.randint(1, 3)):
                        member[rng.randrange(len(member))] = rng.randrange(256)
                z.writestr(info, bytes(member))
        return "either", None
    if kind == "dtype":
        dtype = rng.choice(DTYPES)
        box[key] = new = box[key].to(dtype)
        write(state, ext, path)
        if dtype.is_floating_point:
            return "loaded", lambda e: _contains(e, new.float())
        return "refused", [str(dtype).removeprefix("torch.")]
    if kind == "shape":
        t = box[key]
        box[key] = rng.choice([t.reshape(-1), t[None], t[..., :-1], t[:0], t.reshape(*t.shape, 1, 1, 1)])
        write(state, ext, path)
        return "either", None
    if kind == "nonfinite":
        t = box[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        box[key] = t
        write(state, ext, path)
        return "refused", ["NaN and"]
    # key junk
    junk = rng.randrange(6 if ext == ".pth" else 3)
    if junk == 0:  # a huge key beside the parts: ignored, the rest loads
        state["x" * 200_000] = torch.zeros(1)
        write(state, ext, path)
        return "loaded", lambda e: e.ignored_total == 1 and len(e.ignored_keys[0]) <= 60
    if junk == 1:  # a huge token: refused with a bounded message
        token = "<" + "y" * 100_000 + ">"
        if "params" in state:
            state["params"]["new_concept_embedding"][token] = torch.zeros(16, 768)
        else:
            state["new_concept_embedding." + token] = torch.zeros(16, 768)
        write(state, ext, path)
        return "refused", ["must look like <name>"]
    if junk == 2:  # a key of another prefix: ignored
        state["ema." + key] = box[key].clone()
        write(state, ext, path)
        return "loaded", lambda e: e.ignored_total == 1
    if junk == 3:  # non-string keys, beside the parts or inside one: refused (nothing to guess)
        target = rng.choice([state, box])
        target[rng.choice([7, (1, 2), None, 2.5, True])] = torch.zeros(1)
        write(state, ext, path)
        return "refused", ["has the key"]
    if junk == 4:  # junk where a tensor belongs
        box[key] = rng.choice([{"a": torch.zeros(1)}, [torch.zeros(1)], None, "text", 3, (torch.zeros(1),)])
        write(state, ext, path)
        return "refused", ["expected a tensor"]
    deep: object = torch.zeros(1)  # deep nesting beside the parts (as deep as torch.save goes): ignored
    for _ in range(400):
        deep = {"d": deep}
    state["deep"] = deep
    write(state, ext, path)
    return "loaded", lambda e: e.ignored_keys == ("'deep'",)


def _contains(e: EDLoRA, t: torch.Tensor) -> bool:
    """``t`` is one of the loaded tensors: a LoRA factor, a single-vector table or one XTI layer."""
    loaded = [x for f in (*e.text.values(), e.unet) for pair in f.values() for x in pair]
    loaded += [x[:, 0] for x in e.embeddings.values()] + [row for x in e.embeddings.values() for row in x]
    return any(x.shape == t.shape and torch.equal(x, t) for x in loaded)


def write(state: dict, ext: str, path: Path) -> None:
    if ext == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


KINDS = ("truncate", "bitflip", "pickle_flip", "dtype", "shape", "nonfinite", "key_junk")


def test_fuzzed_files_load_correctly_or_are_refused_naming_the_file(tmp_path):
    rng = random.Random(10)
    torch.manual_seed(10)
    bases = base_files(rng)
    stats = collections.Counter()
    files = 0
    for kind in KINDS:
        for i in range(24):
            ext, state = bases[i % len(bases)]
            if kind == "pickle_flip" and ext != ".pth":
                ext, state = bases[0] if i % 2 else bases[3]
            if kind == "key_junk" and set(state) == set(XTI_LAYER_KEYS):
                ext, state = bases[i % 2]
            path = tmp_path / f"fz{files:03d}_{kind}{ext}"
            files += 1
            expect, check = mutate(kind, ext, state, rng, path)
            try:
                e = load_edlora(str(path))
            except EDLoRAError as err:
                msg = str(err)
                assert msg.startswith(path.name + ":"), msg
                assert len(msg) <= MAX_MESSAGE_CHARS
                assert expect != "loaded", (path.name, msg)
                for piece in check or ():
                    assert piece in msg, (path.name, piece, msg)
                stats[kind, "refused"] += 1
            else:
                check_valid(e)
                assert expect != "refused", path.name
                assert check is None or check(e), path.name
                stats[kind, "loaded"] += 1
    assert files >= 100
    print(f"\nfuzzed {files} files (seed 10):")
    for kind in KINDS:
        print(f"  {kind:12s} loaded {stats[kind, 'loaded']:3d}  refused {stats[kind, 'refused']:3d}")
    assert stats["truncate", "refused"] == 24 and stats["nonfinite", "refused"] == 24


def test_direct_parse_of_junk_states_only_raises_edlora_errors():
    """parse_edlora is public: states nobody wrote on purpose still give named errors."""
    for state in ([], None, 3, {"params": []}, {"unet": torch.zeros(1)}, {(1,): {}}, {"params": {"unet": None}},
                  {"new_concept_embedding": {"<a>": {"<b>": torch.zeros(16, 768)}}}):
        with pytest.raises(EDLoRAError, match=r"^junk\.pth: "):
            parse_edlora(state, "junk.pth")
    with pytest.raises(EDLoRAError, match=r"^j\.pth: has the key 7 \(int\) at the top level"):
        parse_edlora({7: 1}, "j.pth")
    e = parse_edlora({"params": {"new_concept_embedding": {"<ok>": torch.zeros(16, 768)}, "unet": None}}, "ok.pth")
    assert e.tokens == ["<ok>"] and e.unet == {}  # a part that is None is absent
