"""Reading untrusted tensor files: bounded messages, safe reading, tensor validation.

Everything here treats the file as hostile (docs/design.md §2.6): a ``.pth`` is only read with
``torch.load(weights_only=True)``, and only after its zip archive and pickle have been looked at
without running anything; every error is an :class:`EDLoRAError` that names the file; no message
ever stringifies file content whole (:func:`shown`).

Bounds, generous for real files (an ED-LoRA is a few MB to ~200 MB; torch.save writes its
tensors as uncompressed ("stored") zip members and a pickle of ~100 bytes per tensor):

=============================  =====================================================================
:data:`MAX_FILE_BYTES`         4 GiB on disk
:data:`MAX_UNCOMPRESSED_BYTES` 4 GiB in all members of a ``.pth`` archive once inflated
:data:`MAX_COMPRESSION_RATIO`  20 for any compressed member (a deflate bomb of zeros is ~1000)
:data:`MAX_ARCHIVE_MEMBERS`    65,536 members (torch.save: one per tensor, plus 5)
:data:`MAX_PICKLE_BYTES`       8 MiB of ``data.pkl`` (a full SD1.5 ED-LoRA has 82 KB)
:data:`MAX_PICKLE_CONTAINERS`  200,000 dicts / lists / tuples built by the pickle
:data:`MAX_TUPLE_DEPTH`        64 levels of tuples inside tuples (torch.save: 2)
:data:`MAX_TUPLE_WEIGHT`       1,000,000 items of one tuple counted with repeats (hashing cost)
:data:`MAX_TENSORS`            65,536 tensors in a ``.safetensors``
=============================  =====================================================================

The last three exist because hashing a dict key is recursive and not cached: a 1 MB pickle of a
tuple key nested a million deep crashes CPython inside ``torch.load``, and one a few dozen levels
deep whose levels repeat the one below takes hours — both are refused by a scan of the pickle's
opcodes (:func:`pickletools.genops`, no objects built) before ``torch.load`` sees the file.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import EDLoRAError

MAX_FILE_BYTES = 4 << 30
MAX_UNCOMPRESSED_BYTES = 4 << 30
MAX_COMPRESSION_RATIO = 20
MAX_ARCHIVE_MEMBERS = 65536
MAX_PICKLE_BYTES = 8 << 20
MAX_PICKLE_CONTAINERS = 200_000
MAX_TUPLE_DEPTH = 64
MAX_TUPLE_WEIGHT = 1_000_000
MAX_TENSORS = 65536
# No value of a tensor in a concept file, and no entry of a LoRA's weight change, may exceed this in magnitude.
# Trained files stay below ~10 (CLIP's token embeddings are ~0.01-0.1, LoRA factors below 1); from ~1e4 on, a
# table or a weight change multiplied out in a layer overflows float16 (65504) and, larger, float32: the sample
# turns NaN/Inf, a black image.
MAX_ABS_VALUE = 1e4
MAX_ITEM_CHARS = 120     # one key / value / type shown in a message

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch.save before PyTorch 1.6
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
                 "EXT1", "EXT2", "EXT4"}  # the opcodes with which a pickle imports or calls code
_OPCODE_BY_CODE = {op.code: op for op in pickletools.opcodes}  # = pickletools.code2op, which is undocumented




def shown(value: object, limit: int = MAX_ITEM_CHARS) -> str:
    """``value`` rendered for a message in at most ``limit`` characters, whatever it is.

    Strings are quoted (control characters escaped), tensors give dtype and shape, containers
    their type, length and first items (two levels deep), other objects only their type: nothing
    is stringified whole, so a tuple that repeats itself a million times costs nothing here.
    """
    text = _render(value, limit, 0)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render(value: object, budget: int, depth: int) -> str:
    if isinstance(value, str):
        return repr(value[:budget]) + ("…" if len(value) > budget else "")
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):  # int -> str is quadratic (and refused past 4300 digits)
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if torch.is_tensor(value):
        return f"<tensor {dtype_name(value.dtype)} {list(value.shape)}>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (tuple, list, dict, set, frozenset)):
        kind = type(value).__name__
        if depth >= 2 or budget < 8:
            return f"<{kind} of {len(value)}>"
        items = value.items() if isinstance(value, dict) else value
        parts, used = [], 0
        for i, item in enumerate(items):
            if i == 4 or used >= budget:
                parts.append("…")
                break
            if isinstance(value, dict):
                text = f"{_render(item[0], budget - used, depth + 1)}: {_render(item[1], budget - used, depth + 1)}"
            else:
                text = _render(item, budget - used, depth + 1)
            parts.append(text)
            used += len(text) + 2
        inner = ", ".join(parts)
        if isinstance(value, dict):
            return "{" + inner + "}"
        if isinstance(value, tuple):
            return "(" + inner + ("," if len(value) == 1 else "") + ")"
        return ("[" + inner + "]") if isinstance(value, list) else (kind + "({" + inner + "})")
    return f"<{type(value).__name__[:40]}>"


def what_is(value: object) -> str:
    """A short description of a value's kind for "found ..." messages: ``a dict of 3 entries``, ``None``."""
    if torch.is_tensor(value):
        return f"a tensor {dtype_name(value.dtype)} {list(value.shape)}"
    if value is None:
        return "None"
    if isinstance(value, dict):
        return f"a dict of {len(value)} entries"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{type(value).__name__[:40]} {shown(value, 40)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def file_label(name: str) -> str:
    """A file name as it starts messages (cut, like any other item)."""
    return name if len(name) <= MAX_ITEM_CHARS else name[: MAX_ITEM_CHARS - 1] + "…"


def exception_text(e: BaseException, with_type: bool = True) -> str:
    """An exception's text without stringifying whatever objects it carries (a KeyError holds a key)."""
    # a UnicodeError's str() shows one byte; its args hold the whole input
    args = [str(e)] if isinstance(e, UnicodeError) else [a if isinstance(a, str) else shown(a, 60) for a in e.args[:2]]
    lines = [ln.strip() for ln in " ".join(args).splitlines() if ln.strip()]
    kind = type(e).__name__
    if kind in ("error", "Error"):  # struct.error, zlib.error
        kind = f"{type(e).__module__}.{kind}"
    text = (f"{kind}: {lines[0]}" if with_type else lines[0]) if lines else kind
    return text if len(text) <= MAX_ITEM_CHARS else text[: MAX_ITEM_CHARS - 1] + "…"


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("n" if s is None else str(s) for s in shape) + "]"


def check_file_tensor(file_name: str, key: str, tensor: object, *, ndim: int | tuple[int, ...] | None = None,
                      shapes: Sequence[Sequence[int | None]] | None = None, expected: str | None = None,
                      float32: bool = True) -> torch.Tensor:
    """Validate one tensor read from a file and return it detached (as float32 by default).

    Contract, for every loader of untrusted files (ED-LoRAs here, fused bundles in ``bundle.py``):

    * ``tensor`` must be a dense CPU tensor of a float dtype a trainer writes: float16, bfloat16,
      float32 or float64. Integer, bool, complex, float8, quantized and sparse tensors are refused.
    * ``ndim``: the allowed number(s) of dimensions; ``shapes``: allowed shape patterns, where
      ``None`` matches any size (e.g. ``[(16, 768), (16, None, 768)]``); every size must be > 0.
    * A tensor that shows more elements than its storage holds (zero strides: a few bytes posing
      as gigabytes) is refused before anything is copied.
    * With ``float32=True`` the result is float32 (a float64 file is converted: the caller may log
      it); otherwise the file's dtype is kept. NaN or infinite values are refused — also values
      that overflow float32.

    Raises :class:`EDLoRAError` naming ``file_name``, ``key`` (cut to :data:`MAX_ITEM_CHARS`),
    what was found and what was expected; ``expected`` (e.g. ``"an SD1.x ED-LoRA token table is
    [16, 768]"``) replaces the generic expectation in shape errors. The caller bounds the total
    size it accepts from one file; this function bounds only what one tensor may cost.
    """
    where = f"{file_label(file_name)}: {shown(key)}"
    if not torch.is_tensor(tensor):
        raise EDLoRAError(f"{where} is {what_is(tensor)}; expected a tensor"
                          + (f" ({expected})" if expected else ""))
    found = f"{dtype_name(tensor.dtype)} {list(tensor.shape)}"
    if tensor.layout != torch.strided:
        raise EDLoRAError(f"{where} is a {str(tensor.layout).removeprefix('torch.')} tensor; expected a plain "
                          f"dense tensor")
    if tensor.device.type != "cpu":
        raise EDLoRAError(f"{where} is a tensor on the {tensor.device.type} device, without data in the file")
    if tensor.dtype not in FLOAT_DTYPES:
        raise EDLoRAError(f"{where} is {found}; ED-LoRA tensors are floating point (float16, bfloat16, "
                          f"float32 or float64) — the file is damaged or is not what it claims")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    ok = allowed is None or tensor.ndim in allowed
    if ok and shapes is not None:
        ok = any(len(p) == tensor.ndim and all(s is None or s == d for s, d in zip(p, tensor.shape, strict=True))
                 for p in shapes)
    if not ok or 0 in tensor.shape:
        if expected is None:
            wanted = [_shape_text(p) for p in shapes] if shapes is not None else [f"{n}-D" for n in allowed or ()]
            expected = "expected " + " or ".join(wanted) + " with no empty dimension"
        raise EDLoRAError(f"{where} is {found}; {expected}")
    capacity = tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()
    if tensor.numel() > capacity:
        raise EDLoRAError(f"{where} is {found} but its storage holds only {capacity} values (overlapping "
                          f"strides); trainers save plain tensors")
    out = tensor.detach()
    if float32:
        out = out.to(torch.float32)
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        nan = int(torch.isnan(out).sum())
        bad = f"{nan} NaN and {out.numel() - int(finite.sum()) - nan} infinite values"
        if tensor.dtype == torch.float64 and bool(torch.isfinite(tensor).all()):
            bad = "float64 values too large for float32"
        raise EDLoRAError(f"{where} ({found}) has {bad}; a usable ED-LoRA holds only finite numbers — the "
                          f"file is damaged or its training diverged")
    peak = float(out.abs().max())
    if peak > MAX_ABS_VALUE:
        value = next(float(v) for v in (out.max(), out.min()) if abs(float(v)) == peak)
        raise EDLoRAError(f"{where} holds a value of {value:.3g}, beyond ±{MAX_ABS_VALUE:g}, the bound on what "
                          f"trained files hold (they stay below ~10; such values overflow once multiplied out) — "
                          f"the file is damaged or hostile")
    return out


def check_lora_change(file_name: str, where: str, up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> None:
    """Refuse a LoRA pair whose weight change ``scale · up @ down`` may exceed :data:`MAX_ABS_VALUE` anywhere.

    Each entry is bounded without multiplying out (Cauchy-Schwarz: the largest row norm of ``up`` times the
    largest column norm of ``down``, ``[out, r(, 1, 1)]`` / ``[r, in(, kh, kw)]``), so checking costs two passes
    over the factors. Raises :class:`EDLoRAError` naming ``file_name`` and ``where`` (the module)."""
    rows = up.detach().double().reshape(up.shape[0], -1).norm(dim=1).max()
    cols = down.detach().double().reshape(down.shape[0], -1).norm(dim=0).max()
    bound = float(rows * cols) * abs(float(scale))
    if bound > MAX_ABS_VALUE:
        raise EDLoRAError(f"{file_label(file_name)}: {shown(where)}: its factors can change a weight by up to "
                          f"{bound:.3g}, beyond ±{MAX_ABS_VALUE:g}, the bound on what trained LoRAs do (they change "
                          f"weights by far less than 1) — the file is damaged or hostile")


# ---------------------------------------------------------------------------------- reading files


def read_tensor_file(path: str) -> tuple[dict[Any, Any], dict[str, str]]:
    """Read a ``.safetensors`` or a torch.save ``.pth``/``.pt`` file; returns ``(state, metadata)``.

    ``.pth`` files: only zip archives written by torch.save (PyTorch >= 1.6) are read, after the
    checks in the module docstring, and only with ``torch.load(weights_only=True)``; a pickle that
    would need code is refused saying so. Legacy (pre-1.6) and plain-pickle files are refused:
    their tensor sizes come from the pickle itself, so they cannot be bounded before loading.
    ``.safetensors`` files are parsed by safetensors (which checks every offset and size against
    the file). Any failure is an :class:`EDLoRAError` naming the file.
    """
    name = file_label(os.path.basename(path))
    if not os.path.isfile(path):
        raise EDLoRAError(f"{name}: file not found ({shown(path)})")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise EDLoRAError(f"{name}: {size / 2**30:.1f} GiB is more than any ED-LoRA (a few MB to a few hundred MB; "
                          f"the limit is {MAX_FILE_BYTES >> 30} GiB)")
    if size == 0:
        raise EDLoRAError(f"{name}: the file is empty (0 bytes) — truncated or corrupt")
    try:
        if os.path.splitext(path)[1].lower() == ".safetensors":
            return _read_safetensors(path, name, size)
        return _read_pth(path, name, size), {}
    except EDLoRAError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever else a hostile file provokes, named
        raise EDLoRAError(f"{name}: unreadable file ({exception_text(e)})") from e


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; ``{}`` when it has none or is unreadable
    (:func:`read_tensor_file` then says why)."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a peek only
        return {}


def _read_safetensors(path: str, name: str, size: int) -> tuple[dict[Any, Any], dict[str, str]]:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise EDLoRAError(f"{name}: {size} bytes is too short for a safetensors file — truncated or corrupt")
    header_len = struct.unpack("<Q", head)[0]
    if header_len > size - 8:
        raise EDLoRAError(f"{name}: not a readable safetensors file (its header claims {header_len} bytes but the "
                          f"file has {size}) — truncated or corrupt")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise EDLoRAError(f"{name}: {len(keys)} tensors is more than an ED-LoRA holds "
                                  f"(limit {MAX_TENSORS})")
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except EDLoRAError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, TypeError for dtypes torch lacks
        text = exception_text(e, with_type=not isinstance(e, SafetensorError))
        raise EDLoRAError(f"{name}: not a readable safetensors file "
                          f"({text.removeprefix('Error while deserializing header: ')})") from e


def _read_pth(path: str, name: str, size: int) -> dict[Any, Any]:
    with open(path, "rb") as fh:
        head = fh.read(len(_LEGACY_MAGIC))
    if head.startswith(_LEGACY_MAGIC):
        raise EDLoRAError(f"{name}: a legacy .pth (torch.save before PyTorch 1.6), which is not read: its pickle "
                          f"sets the tensor sizes, so it cannot be checked before loading; re-save it with a current "
                          f"torch.save, or convert it to .safetensors where you trust it")
    if not head.startswith(_ZIP_MAGIC):
        imports = _plain_pickle_imports(path, size)
        if imports is not None:
            runs = (f": loading it could run code (it imports {', '.join(shown(g, 60) for g in imports[:3])}"
                    f"{' and more' if len(imports) > 3 else ''}); nothing in it was run" if imports else
                    ": a .pth is read only when torch.save (PyTorch 1.6 or later) wrote it")
            raise EDLoRAError(f"{name}: a plain pickle (not a torch.save archive), refused unread{runs}; convert it "
                              f"to .safetensors where you trust it")
        if head[:1] == b"\x80":
            what = "it starts like a plain pickle but does not parse as one"
        elif head[8:9] == b"{":
            what = "it looks like a .safetensors file: rename it"
        else:
            what = "it does not start like a torch.save zip archive"
        raise EDLoRAError(f"{name}: not a readable .pth file — truncated or corrupt, or not a PyTorch file ({what})")
    pickles = _check_archive(path, name, size)
    for data in pickles:
        _scan_pickle(name, data)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(name, e) from None
    except Exception as e:  # noqa: BLE001 - the unpickler's IndexError, KeyError, struct.error, ... on bad bytes
        raise EDLoRAError(f"{name}: truncated or corrupt .pth file ({exception_text(e)})") from None
    if not isinstance(state, dict):
        raise EDLoRAError(f"{name}: expected a dict of tensors, found {what_is(state)}")
    return state


_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE8"}


def _plain_pickle_imports(path: str, size: int) -> list[str] | None:
    """The globals (``module.name``) a file that is a plain pickle imports, in order; None when it does not
    parse as a pickle. Read by :func:`pickletools.genops` (nothing is built or run), at most
    :data:`MAX_PICKLE_BYTES` of it (a longer file counts as a pickle when that much parses)."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_PICKLE_BYTES)
    imports: list[str] = []
    strings: list[str] = []  # the strings pushed so far (STACK_GLOBAL takes its module and name from them)
    memo: dict[Any, str | None] = {}  # memo index -> the string stored there (None: something else)
    last: str | None = None  # the string the last opcode pushed
    try:
        for op, arg, _ in pickletools.genops(data):
            kind, pushed = op.name, None
            if kind == "GLOBAL":
                imports.append(str(arg).replace(" ", "."))
            elif kind == "STACK_GLOBAL":
                imports.append(".".join(strings[-2:]) if len(strings) >= 2 else "an unnamed global")
            elif kind in _STRING_OPCODES:
                pushed = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            elif kind in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if kind == "MEMOIZE" else arg] = pushed = last
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            elif kind == "FRAME":
                pushed = last
            if pushed is not None and kind not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME"):
                strings.append(pushed)
            last = pushed
    except (ValueError, KeyError, IndexError, UnicodeDecodeError):  # not a pickle, or cut short
        if size <= len(data) or not (imports or strings):
            return None
    return imports


def _zip_entry_count(path: str, size: int) -> tuple[int, int]:
    """``(entries, central directory bytes)`` from the end-of-central-directory record(s).

    Read before :mod:`zipfile` parses the directory, so a directory of millions of entries is
    refused without building millions of objects. Returns ``(-1, -1)`` when no record is found.
    """
    tail_len = min(size, 22 + 65535 + 20)
    with open(path, "rb") as fh:
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return -1, -1
    entries, cd_bytes = struct.unpack_from("<HI", tail, at + 10)
    if entries == 0xFFFF or cd_bytes == 0xFFFFFFFF:  # zip64: the real counts are in the zip64 record
        loc = at - 20
        if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
            return -1, -1
        (offset,) = struct.unpack_from("<Q", tail, loc + 8)
        with open(path, "rb") as fh:
            fh.seek(offset)
            rec = fh.read(56)
        if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
            return -1, -1
        entries, cd_bytes = struct.unpack("<QQ", rec[32:48])
    return entries, cd_bytes


def _check_archive(path: str, name: str, size: int) -> list[bytes]:
    """Refuse archives no torch.save writes (module docstring); returns the ``data.pkl`` records."""
    entries, cd_bytes = _zip_entry_count(path, size)
    if entries < 0:
        raise EDLoRAError(f"{name}: truncated or corrupt .pth file (the zip archive has no end record)")
    if cd_bytes > size:
        raise EDLoRAError(f"{name}: truncated or corrupt .pth file (its zip directory claims {cd_bytes} bytes of a "
                          f"{size}-byte file)")
    if entries > MAX_ARCHIVE_MEMBERS or cd_bytes > MAX_ARCHIVE_MEMBERS * 512:
        raise EDLoRAError(f"{name}: the .pth archive lists {entries} members in a {cd_bytes}-byte directory (limit "
                          f"{MAX_ARCHIVE_MEMBERS} members); torch.save writes one per tensor")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise EDLoRAError(f"{name}: the .pth archive has {len(infos)} members (limit {MAX_ARCHIVE_MEMBERS}); "
                                  f"torch.save writes one per tensor")
            total = stored = 0
            seen: set[str] = set()
            for info in infos:
                if info.filename in seen:
                    count = sum(i.filename == info.filename for i in infos)
                    raise EDLoRAError(f"{name}: the .pth archive holds {count} members named "
                                      f"{shown(info.filename, 60)} (which one torch.load reads is not clear); "
                                      f"torch.save writes one of each; nothing in it was run")
                seen.add(info.filename)
                member = f"{name}: archive member {shown(info.filename, 60)}"
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise EDLoRAError(f"{member} uses zip compression method {info.compress_type}; torch.save "
                                      f"stores members uncompressed")
                if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                    raise EDLoRAError(f"{member} is stored uncompressed but lists {info.compress_size} bytes "
                                      f"stored and {info.file_size} unpacked — truncated or corrupt")
                if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) and info.file_size > 4096:
                    raise EDLoRAError(f"{member} inflates {info.compress_size} bytes to {info.file_size} (more "
                                      f"than {MAX_COMPRESSION_RATIO}x): refused as a zip bomb; torch.save "
                                      f"stores members uncompressed")
                total += info.file_size
                stored += info.compress_size
            if total > MAX_UNCOMPRESSED_BYTES:
                raise EDLoRAError(f"{name}: the .pth archive unpacks to {total / 2**30:.1f} GiB (limit "
                                  f"{MAX_UNCOMPRESSED_BYTES >> 30} GiB); an ED-LoRA is a few hundred MB at most")
            if stored > size:
                raise EDLoRAError(f"{name}: the .pth archive lists {stored} bytes of members in a {size}-byte "
                                  f"file — truncated or corrupt")
            pickles = [i for i in infos if i.filename.endswith("data.pkl")]
            if len(pickles) > 1:
                raise EDLoRAError(f"{name}: the .pth archive holds {len(pickles)} pickles (data.pkl) "
                                  f"({', '.join(shown(i.filename, 40) for i in pickles[:3])}); torch.save writes one; "
                                  f"nothing in it was run")
            if sum(i.file_size for i in pickles) > MAX_PICKLE_BYTES:
                raise EDLoRAError(f"{name}: the .pth's pickle is {sum(i.file_size for i in pickles)} bytes (limit "
                                  f"{MAX_PICKLE_BYTES}); an ED-LoRA's is about 100 bytes per tensor")
            return [zf.read(i) for i in pickles]
    except EDLoRAError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, CRC mismatch, EOFError ...
        raise EDLoRAError(f"{name}: truncated or corrupt .pth file ({exception_text(e)})") from None


_LEAF = (0, 1)  # (tuple depth, hashing weight) of anything that is not a tuple
# torch's weights-only unpickler allows bytearray(n), which allocates and zeroes n bytes: 8 GB from a
# 30-byte pickle. torch.save writes it only for bytearray objects, which no ED-LoRA holds.
_REFUSED_GLOBALS = {"builtins bytearray", "__builtin__ bytearray"}


def _scan_pickle(name: str, data: bytes) -> None:
    """Refuse a pickle whose tuples would crash or stall hashing, or that builds too many containers.

    Follows the stack of the opcodes torch's weights-only unpickler accepts, tracking for tuples
    their nesting depth and their size counted with repeats (what ``hash`` walks); nothing is
    built. At the first opcode it does not follow, or bytes that do not parse, it stops: then
    ``torch.load`` refuses the pickle itself, with its own (classified) error.
    """
    stack: list[tuple[int, int]] = []
    marks: list[list[tuple[int, int]]] = []
    memo: dict[int, tuple[int, int]] = {}
    containers = 0
    sizes = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
    leaves = {"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1",
              "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "LONG1", "GLOBAL"}
    try:
        for op, arg, _ in pickletools.genops(data):
            kind = op.name
            if kind == "MARK":
                marks.append(stack)
                stack = []
            elif kind == "TUPLE" or kind in sizes:
                if kind == "TUPLE":
                    items, stack = stack, marks.pop()
                else:
                    n = sizes[kind]
                    items = stack[len(stack) - n:] if n else []
                    if len(items) < n:
                        return
                    del stack[len(stack) - n:]
                depth = 1 + max((d for d, _ in items), default=0)
                weight = 1 + sum(w for _, w in items)
                if depth > MAX_TUPLE_DEPTH or weight > MAX_TUPLE_WEIGHT:
                    raise EDLoRAError(f"{name}: refused — the .pth's pickle builds a tuple nested {depth} deep with "
                                      f"{weight} items counting repeats (limits {MAX_TUPLE_DEPTH} and "
                                      f"{MAX_TUPLE_WEIGHT}); torch.save never writes one; nothing in it was run")
                stack.append((depth, weight))
                containers += 1
            elif kind == "GLOBAL" and arg in _REFUSED_GLOBALS:
                raise EDLoRAError(f"{name}: refused — the .pth's pickle calls bytearray(), which can allocate any "
                                  f"amount of memory and which torch.save never writes for tensors; nothing in it "
                                  f"was run")
            elif kind in leaves:
                stack.append(_LEAF)
                containers += kind.startswith("EMPTY_")
            elif kind in ("BINPUT", "LONG_BINPUT"):
                assert isinstance(arg, int)  # genops reads these opcodes' memo index as an int
                memo[arg] = stack[-1]
            elif kind in ("BINGET", "LONG_BINGET"):
                assert isinstance(arg, int)
                stack.append(memo[arg])
            elif kind in ("SETITEM", "APPEND", "BUILD"):
                del stack[-2 if kind == "SETITEM" else -1:]
            elif kind in ("SETITEMS", "APPENDS"):
                stack = marks.pop()
            elif kind in ("REDUCE", "NEWOBJ", "BINPERSID"):
                if kind != "BINPERSID":
                    stack.pop()
                stack[-1] = _LEAF
            elif kind != "PROTO":  # STOP, or an opcode torch.load refuses itself
                return
            if containers > MAX_PICKLE_CONTAINERS:
                raise EDLoRAError(f"{name}: refused — the .pth's pickle builds more than {MAX_PICKLE_CONTAINERS} "
                                  f"dicts, lists and tuples; an ED-LoRA needs a few per tensor; nothing in it was run")
    except EDLoRAError:
        raise
    except (ValueError, IndexError, KeyError):  # unparseable bytes: torch.load will say what is wrong
        return


def _unpickling_error(name: str, e: pickle.UnpicklingError) -> EDLoRAError:
    """torch.load's refusal, classified: needs code / needs more than tensors / corrupt."""
    text = "".join(a for a in e.args if isinstance(a, str))
    refused = ("; .pth files are only read with torch.load(weights_only=True), so nothing in it was run. If you "
               "trust its source, re-save its tensors as a plain state dict or as .safetensors")
    if "Weights only load failed" not in text:
        return EDLoRAError(f"{name}: truncated or corrupt .pth file ({exception_text(e)})")
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return EDLoRAError(f"{name}: refused — this .pth needs code to load (it imports "
                           f"{shown(found[1].rstrip('.'), 80)}){refused}")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        op = _OPCODE_BY_CODE.get(chr(int(found[1]))) if int(found[1]) < 256 else None
        if op is None:
            return EDLoRAError(f"{name}: truncated or corrupt .pth file (byte {found[1]} in its pickle is not a "
                               f"pickle opcode)")
        if op.name in _CODE_OPCODES:
            return EDLoRAError(f"{name}: refused — this .pth needs code to load (pickle opcode {op.name} imports "
                               f"or calls code){refused}")
        return EDLoRAError(f"{name}: refused — this .pth needs more than plain tensors to load (pickle opcode "
                           f"{op.name}, which torch.save never writes){refused}")
    if re.search(r"String is too long|Can only (append|extend|SETITEM)", text):
        return EDLoRAError(f"{name}: truncated or corrupt .pth file (its pickle is malformed)")
    found = re.search(r"reduce for unrecognized function (.+)", text)
    what = f"it calls {shown(found[1], 80)}" if found else "it builds objects other than tensors"
    return EDLoRAError(f"{name}: refused — this .pth needs code to load ({what}){refused}")
