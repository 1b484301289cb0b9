"""ED-LoRA files: reading (.pth and .safetensors), validation, and the flat safetensors layout.

An ED-LoRA (docs/design.md §2.1) holds per-layer token tables (``new_concept_embedding``) and LoRA factors
for the SD1.x text encoder and UNet, in diffusers module naming, in one of two key spellings:
``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` (Mix-of-Show ``main``) or
``<module>_lora.down.weight`` / ``<module>_lora.up.weight`` (``research_branch``).

Flat safetensors layout written by :func:`save_edlora` (metadata ``format=mixofshow-edlora``)::

    new_concept_embedding.<token>          [16, 768]  (or [16, n, 768] for n-vector tokens)
    text_encoder.<module>.lora_down.weight [r, in]
    text_encoder.<module>.lora_up.weight   [out, r]
    unet.<module>.lora_down.weight         [r, in] or [r, in, 1, 1]
    unet.<module>.lora_up.weight           [out, r] or [out, r, 1, 1]

Files are untrusted (:mod:`fusion.files.filecheck`): a ``.pth`` is only read with
``torch.load(weights_only=True)``, every tensor is checked (float dtype, shape, finite), and every
error is an :class:`EDLoRAError` naming the file, the key and what was expected.

What is refused and what is only warned about:

* **Refused** — anything inside the three parts that cannot be applied exactly as the trainer
  meant: a token that is not ``<name>``, a table that is not ``[16, 768]`` / ``[16, n, 768]``, a
  key in ``text_encoder`` / ``unet`` that is not a LoRA factor in one of the two spellings (e.g. an
  ``alpha``), a module outside SD1.x's text encoder / UNet transformer blocks, a lone or duplicated
  factor, a part that is not a dict, a non-string key inside a part, at the top level or inside
  ``params`` (nothing says what an int or a boolean key would mean); an XTI file with a key beside its
  layer keys; any bad tensor.
* **Ignored with one warning** — entries beside the parts, as training checkpoints carry them
  (``optimizer``, ``step``, ``epoch``, flat keys of other prefixes). They are
  listed in :attr:`EDLoRA.ignored_keys` so nodes can show them. A part that is ``None`` counts as
  absent.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import EDLoRAError
from ..families import SD15, ModelFamily
from ..log import log
from ..versions import BUNDLE_FORMAT, EDLORA_FORMAT, EDLORA_FORMAT_VERSION
from .filecheck import (
    check_file_tensor,
    check_lora_change,
    exception_text,
    file_label,
    read_tensor_file,
    safetensors_metadata,
    shown,
    what_is,
)

__all__ = ["EDLoRA", "TOKEN_PATTERN", "convert_to_safetensors", "file_digest", "load_edlora", "output_stem",
           "parse_edlora", "parse_xti", "read_state_dict", "save_edlora", "to_flat_state_dict", "unique_output_path"]


TOKEN_PATTERN = re.compile(r"<[^<>\s()\[\]{}:,]+>")
MAX_EDLORA_ELEMENTS = 1 << 28   # values in all tensors of one file: 1 GiB as float32; real ED-LoRAs hold < 50M
MAX_VECTORS_PER_TOKEN = 75      # a 77-token prompt chunk holds 75 words
MAX_TOKEN_CHARS = 100
MAX_IGNORED_KEPT = 100          # ignored keys listed on the EDLoRA (all are counted)
_IGNORED_SHOWN = 5              # ... and in the warning
_PARTS = ("new_concept_embedding", "text_encoder", "unet")
_KEY_SPELLINGS = (  # main branch, research_branch
    re.compile(r"^(.+)\.lora_(down|up)\.weight$"),
    re.compile(r"^(.+)_lora\.(down|up)\.weight$"),
)


def _table_rule(family: ModelFamily) -> str:
    rows, width = family.layer_count, family.text_width
    return (f"an {family.label} ED-LoRA token table is [{rows}, {width}] (one row per cross-attention layer), "
            f"or [{rows}, n, {width}] for n vectors")


@dataclass
class EDLoRA:
    """One ED-LoRA in memory. LoRA factors are ``(up, down)`` pairs keyed by diffusers module name.

    ``ignored_keys``: the first :data:`MAX_IGNORED_KEPT` file entries that were not loaded (shown as
    in messages); ``ignored_total`` counts them all. ``digest`` is empty for a concept made in memory (trained).
    """

    name: str
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    unet: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    digest: str = ""
    family: ModelFamily = SD15
    ignored_keys: tuple[str, ...] = ()
    ignored_total: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # written into a saved file (a trained concept's settings)

    @property
    def tokens(self) -> list[str]:
        return list(self.embeddings)

    @property
    def ignored_summary(self) -> str:
        """One line for logs and node UIs, ``""`` when nothing was ignored."""
        if not self.ignored_total:
            return ""
        first = ", ".join(self.ignored_keys[:_IGNORED_SHOWN])
        more = f" and {self.ignored_total - _IGNORED_SHOWN} more" if self.ignored_total > _IGNORED_SHOWN else ""
        what = "entry that is" if self.ignored_total == 1 else "entries that are"
        return f"{file_label(self.name)}: ignored {self.ignored_total} {what} not part of an ED-LoRA: {first}{more}"


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (cache keys and provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _named(name: str) -> Iterator[None]:
    """Whatever escapes the checks (a bug, or a structure nobody foresaw) still names the file."""
    try:
        yield
    except EDLoRAError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EDLoRAError(f"{file_label(name)}: unreadable ED-LoRA ({exception_text(e)})") from e


def read_state_dict(path: str) -> tuple[dict[Any, Any], dict[str, str]]:
    """Read a ``.safetensors`` or (safely) a torch.save ``.pth``/``.pt`` file; returns (state, metadata).

    See :func:`fusion.filecheck.read_tensor_file` for what is refused before anything is loaded.
    """
    with _named(os.path.basename(path)):
        return read_tensor_file(path)


class _Reader:
    """Per-file bookkeeping while parsing: the element budget, ignored keys, float64 conversions."""

    def __init__(self, name: str) -> None:
        self.name = file_label(name)
        self.ignored: list[str] = []
        self.ignored_total = 0
        self.float64 = 0
        self.elements = 0

    def ignore(self, key: object) -> None:
        self.ignored_total += 1
        if len(self.ignored) < MAX_IGNORED_KEPT:
            self.ignored.append(shown(key, 60))

    def tensor(self, key: str, value: object, **checks: Any) -> torch.Tensor:
        if torch.is_tensor(value):
            self.elements += value.numel()  # before any copy: the budget bounds what loading allocates
            if self.elements > MAX_EDLORA_ELEMENTS:
                raise EDLoRAError(f"{self.name}: its tensors hold more than {MAX_EDLORA_ELEMENTS} values in all (at "
                                  f"{shown(key)}); an ED-LoRA holds a few million")
            self.float64 += value.dtype == torch.float64
        return check_file_tensor(self.name, key, value, **checks)

    def finish(self, edlora: EDLoRA) -> EDLoRA:
        edlora.ignored_keys, edlora.ignored_total = tuple(self.ignored), self.ignored_total
        if self.float64:
            log.info("Mix-of-Show: %s: %d float64 tensor%s converted to float32", self.name, self.float64,
                     "" if self.float64 == 1 else "s")
        if edlora.ignored_total:
            log.warning("Mix-of-Show: %s (the rest was loaded)", edlora.ignored_summary)
        return edlora


def _check_string_keys(r: _Reader, state: dict[Any, Any]) -> None:
    """Refuse a key that is not a string where the parts (or a flat file's tensors) are: no trainer writes one,
    and nothing tells what it would mean (``True == 1``, a tensor as a key): refused rather than guessed at."""
    for key in state:
        if not isinstance(key, str):
            raise EDLoRAError(f"{r.name}: has the key {shown(key, 60)} ({type(key).__name__[:40]}) at the top level; "
                              f"ED-LoRA keys are strings, so it is refused rather than guessed at")


def _gather_parts(state: object, r: _Reader) -> dict[str, dict[str, object]]:
    """``{part: {rest: value}}`` for the parts present in a nested, ``params``-wrapped or flat state.

    Other entries are ignored (:meth:`_Reader.ignore`); a part that is ``None`` counts as absent.
    """
    if not isinstance(state, dict):
        raise EDLoRAError(f"{r.name}: expected a dict of tensors, found {what_is(state)}")
    _check_string_keys(r, state)
    if "params" in state:
        inner = state["params"]
        if not isinstance(inner, dict):
            raise EDLoRAError(f"{r.name}: 'params' is {what_is(inner)}; expected a dict holding "
                              f"'new_concept_embedding', 'text_encoder' and 'unet'")
        _check_string_keys(r, inner)
        for key in state:
            if key != "params":
                r.ignore(key)
        state = inner
    parts: dict[str, dict[str, object]] = {}

    def put(part: str, rest: str, value: object) -> None:
        if rest in parts.setdefault(part, {}):
            raise EDLoRAError(f"{r.name}: {shown(part + '.' + rest)} is given twice (nested and flat)")
        parts[part][rest] = value

    for key, value in state.items():
        if key in _PARTS:
            if value is None:
                continue
            parts.setdefault(key, {})
            if not isinstance(value, dict):
                raise EDLoRAError(f"{r.name}: {shown(key)} is {what_is(value)}; expected a dict of "
                                  + ("token -> tensor" if key == _PARTS[0] else "LoRA factor name -> tensor"))
            for rest, item in value.items():
                if not isinstance(rest, str):
                    raise EDLoRAError(f"{r.name}: {shown(key)} has the key {shown(rest)}; expected "
                                      + ("tokens like <name>" if key == _PARTS[0] else "LoRA factor names"))
                put(key, rest, item)
        else:
            part, dot, rest = key.partition(".")
            if part in _PARTS and dot:
                put(part, rest, value)
            else:
                r.ignore(key)
    return parts


def _split_lora_factors(r: _Reader, part: str, flat: dict[str, object],
                        family: ModelFamily) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, dict[str, object]] = {}
    for key, value in flat.items():
        for pattern in _KEY_SPELLINGS:
            m = pattern.match(key)
            if m:
                if m[2] in factors.setdefault(m[1], {}):
                    raise EDLoRAError(f"{r.name}: {shown(part + '.' + m[1])} has its lora {m[2]} factor twice "
                                      f"(in both key spellings)")
                factors[m[1]][m[2]] = value
                break
        else:
            raise EDLoRAError(f"{r.name}: unexpected key {shown(part + '.' + key)} (expected "
                              f"<module>.lora_up/lora_down.weight or <module>_lora.up/down.weight)")
    out = {}
    for module, pair in factors.items():
        where = shown(f"{part}.{module}")
        if set(pair) != {"up", "down"}:
            raise EDLoRAError(f"{r.name}: {where} has only a lora {'/'.join(pair)} factor")
        encoder = next((e for e in family.text_encoders if e.lora_part == part), None)
        if encoder is not None:
            if not encoder.is_lora_module(module):
                raise EDLoRAError(f"{r.name}: {where} is not a CLIP text-encoder linear of {family.label}")
        else:
            try:
                family.ldm_unet_module(module)
            except KeyError:
                raise EDLoRAError(f"{r.name}: {where} is not a transformer-block module of the {family.label} "
                                  f"UNet") from None
        up = r.tensor(f"{part}.{module}.lora_up.weight", pair["up"], ndim=(2, 4))
        down = r.tensor(f"{part}.{module}.lora_down.weight", pair["down"], ndim=(2, 4))
        if down.ndim != up.ndim or up.shape[1] != down.shape[0] or up.shape[2:] != down.shape[2:] \
                or up.shape[2:] not in ((), (1, 1)):
            raise EDLoRAError(f"{r.name}: {where} factors have incompatible shapes up {list(up.shape)} @ down "
                              f"{list(down.shape)} (expected [out, r] @ [r, in], or [out, r, 1, 1] @ [r, in, 1, 1])")
        check_lora_change(r.name, f"{part}.{module}", up, down)
        if encoder is not None and not module.endswith("fc2") and down.shape[1] != encoder.width:
            raise EDLoRAError(f"{r.name}: text-encoder LoRA {where} takes {down.shape[1]} inputs; an {family.label} "
                              f"ED-LoRA has a {encoder.width}-wide CLIP text encoder (is it for SD2/SDXL?)")
        out[module] = (up, down)
    return out


def _check_token(r: _Reader, token: str) -> None:
    if len(token) > MAX_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
        raise EDLoRAError(f"{r.name}: concept token {shown(token)} must look like <name> (angle brackets, no "
                          f"spaces, at most {MAX_TOKEN_CHARS} characters)")


def _check_table(r: _Reader, table: object, key: str, family: ModelFamily = SD15) -> torch.Tensor:
    rows, width = family.layer_count, family.text_width
    shape = tuple(table.shape) if torch.is_tensor(table) else ()
    hint = " — is it for SD2/SDXL?" if len(shape) in (2, 3) and shape[-1] not in (width, 0) else ""
    t = r.tensor(key, table, shapes=[(rows, width), (rows, None, width)], expected=_table_rule(family) + hint)
    t = t if t.ndim == 3 else t.unsqueeze(1)
    if t.shape[1] > MAX_VECTORS_PER_TOKEN:
        raise EDLoRAError(f"{r.name}: {shown(key)} has {t.shape[1]} vectors per layer; a prompt chunk holds at most "
                          f"{MAX_VECTORS_PER_TOKEN}")
    return t


def _xti_hint(state: object, family: ModelFamily) -> str:
    if not isinstance(state, dict):
        return ""
    present = [k for k in family.xti_keys if k in state]
    if not present:
        return ""
    missing = [k for k in family.xti_keys if k not in state]
    return (f"; it has {len(present)} of the {len(family.xti_keys)} XTI layer keys (missing "
            f"{', '.join(missing)}), so it is not an XTI embedding either")


def parse_edlora(state: dict[Any, Any], name: str, family: ModelFamily = SD15) -> EDLoRA:
    """Validate a loaded state dict (nested, ``params``-wrapped or flat) and return an :class:`EDLoRA`.

    Token tables are normalised to ``[L, n, C]`` float32 (the family's L layers and C-wide rows; n vectors
    per token, ED-LoRA has n = 1), LoRA factors to float32. Raises :class:`EDLoRAError` (module docstring:
    what is refused, what is ignored with a warning).
    """
    with _named(name):
        r = _Reader(name)
        parts = _gather_parts(state, r)
        if not parts:
            keys = ", ".join(shown(k, 40) for k in itertools.islice(state, 6))
            raise EDLoRAError(f"{r.name}: not an ED-LoRA — no 'new_concept_embedding', 'text_encoder' or 'unet' part "
                              f"(top-level keys: {keys or 'none'}){_xti_hint(state, family)}")
        tables = {}
        for tok, table in parts.get("new_concept_embedding", {}).items():
            _check_token(r, tok)
            tables[tok] = _check_table(r, table, f"new_concept_embedding.{tok}", family)
        if not tables:
            raise EDLoRAError(f"{r.name}: defines no concept token (empty 'new_concept_embedding')")
        return r.finish(EDLoRA(name=name, embeddings=tables, family=family,
                               text_encoder=_split_lora_factors(r, "text_encoder", parts.get("text_encoder", {}),
                                                                family),
                               unet=_split_lora_factors(r, "unet", parts.get("unet", {}), family)))


def _is_xti_state(state: object, family: ModelFamily) -> bool:
    """A kohya XTI (P+) embedding: all of the family's layer keys (IN01..OUT11) and no ED-LoRA part."""
    return isinstance(state, dict) and all(k in state for k in family.xti_keys) and not any(
        isinstance(k, str) and (k in _PARTS or k == "params" or k.partition(".")[0] in _PARTS) for k in state)


def parse_xti(state: dict[Any, Any], name: str, token: str, family: ModelFamily = SD15) -> EDLoRA:
    """A kohya XTI (P+) embedding: one key per layer (IN01..OUT11), each ``[n, C]``, becomes one token table.

    Any other entry is refused (kohya writes exactly the layer keys).
    """
    with _named(name):
        r = _Reader(name)
        _check_token(r, token)
        keys, width = family.xti_keys, family.text_width
        if not isinstance(state, dict) or not all(k in state for k in keys):
            raise EDLoRAError(f"{r.name}: not an XTI embedding (expected the keys {', '.join(keys)})")
        rows = [r.tensor(k, state[k], shapes=[(None, width)],
                         expected=f"an {family.label} XTI layer is [n, {width}]") for k in keys]
        if any(row.shape != rows[0].shape for row in rows):
            shapes = sorted({str(list(row.shape)) for row in rows})
            raise EDLoRAError(f"{r.name}: XTI layers must all have one shape [n, {width}]; found "
                              f"{', '.join(shapes)}")
        extra = [k for k in state if not (isinstance(k, str) and k in keys)]
        if extra:
            raise EDLoRAError(f"{r.name}: an XTI embedding has exactly the {len(keys)} layer keys {keys[0]} … "
                              f"{keys[-1]}; this file also has {', '.join(shown(k, 40) for k in extra[:3])}"
                              f"{' and more' if len(extra) > 3 else ''} — which tensor is the embedding is not clear")
        table = torch.stack(rows)
        if table.shape[1] > MAX_VECTORS_PER_TOKEN:
            raise EDLoRAError(f"{r.name}: {table.shape[1]} vectors per layer; a prompt chunk holds at most "
                              f"{MAX_VECTORS_PER_TOKEN}")
        return r.finish(EDLoRA(name=name, embeddings={token: table}, family=family))


def load_edlora(path: str, family: ModelFamily = SD15) -> EDLoRA:
    """Load an ED-LoRA or a kohya XTI embedding file from disk (never running pickled code).

    A fused bundle (metadata ``format=mixofshow-fused-bundle``) is refused: it loads as a bundle.
    """
    name = os.path.basename(path)
    with _named(name):
        state, meta = read_state_dict(path)
        if meta.get("format") == BUNDLE_FORMAT:
            raise EDLoRAError(f"{file_label(name)}: a fused ED-LoRA bundle (format={BUNDLE_FORMAT}), not a single "
                              f"ED-LoRA: a bundle is loaded whole (fused weights and concepts), never as an ED-LoRA")
        if _is_xti_state(state, family):
            stem = re.sub(r"[^A-Za-z0-9_\-.]", "_", os.path.splitext(name)[0])
            if len(stem) > MAX_TOKEN_CHARS - 2:  # cut, it would not be the name a user types
                raise EDLoRAError(f"{file_label(name)}: an XTI embedding's token is its file name, <{stem[:240]}>, "
                                  f"which is {len(stem)} characters long; rename the file to at most "
                                  f"{MAX_TOKEN_CHARS - 2} characters (tokens are at most {MAX_TOKEN_CHARS} with the "
                                  f"brackets)")
            edlora = parse_xti(state, name, f"<{stem}>", family)
        else:
            edlora = parse_edlora(state, name, family)
        edlora.digest = file_digest(path)
        return edlora


def to_flat_state_dict(edlora: EDLoRA) -> dict[str, torch.Tensor]:
    """The flat safetensors layout (module docstring); single-vector tables are stored as [L, C]."""
    flat = {}
    for tok, table in edlora.embeddings.items():
        flat[f"new_concept_embedding.{tok}"] = (table[:, 0] if table.shape[1] == 1 else table).contiguous()
    for part, factors in (("text_encoder", edlora.text_encoder), ("unet", edlora.unet)):
        for module, (up, down) in factors.items():
            flat[f"{part}.{module}.lora_up.weight"] = up.contiguous()
            flat[f"{part}.{module}.lora_down.weight"] = down.contiguous()
    return flat


def save_edlora(edlora: EDLoRA, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the flat safetensors layout (via a ``.part`` file, so a failed write leaves no half file)."""
    meta = {"format": EDLORA_FORMAT, "version": EDLORA_FORMAT_VERSION, "tokens": " ".join(edlora.tokens)}
    meta.update(edlora.metadata)
    meta.update(extra_metadata or {})
    tmp = path + ".part"
    try:
        save_file(to_flat_state_dict(edlora), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_to_safetensors(src: str, dst: str) -> EDLoRA:
    """Convert any readable ED-LoRA (.pth in either key spelling, or .safetensors) to the flat layout.

    Refuses a fused bundle (converting it would keep only its token tables) and ``dst == src``.
    Entries that are not part of the ED-LoRA (``ignored_keys``) are not written.
    """
    name = file_label(os.path.basename(src))
    if os.path.splitext(src)[1].lower() == ".safetensors" and \
            safetensors_metadata(src).get("format") == BUNDLE_FORMAT:
        raise EDLoRAError(f"{name}: a fused ED-LoRA bundle is already a .safetensors; bundles are not converted "
                          f"(only its token tables would be written, without its fused weights)")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise EDLoRAError(f"{name}: the converted file would overwrite its own source; choose another output name")
    edlora = load_edlora(src)
    save_edlora(edlora, dst, {"converted_from": os.path.basename(src)})
    return edlora


MAX_STEM_BYTES = 200  # a file name is at most 255 bytes: room for "_00001" and ".safetensors"


def output_stem(name: str, where: str) -> str:
    """``name`` as the stem of a file the pack writes: directories dropped, a ``.safetensors`` suffix (any case)
    removed. Refused before anything is written, with :class:`EDLoRAError` naming ``where`` (the node and input):
    a name with a NUL or control character, one longer than :data:`MAX_STEM_BYTES` bytes (UTF-8), one that names
    no file (empty, ``.``, ``..``)."""
    base = os.path.basename(name.strip().replace("\\", "/"))
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    size = len(base.encode("utf-8", "surrogatepass"))
    why = ("a NUL or control character is in it" if any(ord(c) < 32 or ord(c) == 127 for c in base)
           else "it holds a lone surrogate, which no file name can" if any(0xD800 <= ord(c) < 0xE000 for c in base)
           else f"it is {size} bytes long; at most {MAX_STEM_BYTES}" if size > MAX_STEM_BYTES
           else "it names no file" if not base.strip(". ") else "")
    if why:
        raise EDLoRAError(f"{where}: {shown(name, 60)} is not a usable file name ({why})")
    return base


def unique_output_path(folder: str, stem: str, overwrite: bool = False, *, source: str | None = None,
                       where: str = "output name") -> str:
    """Where the Convert node writes ``<stem>.safetensors`` in ``folder``, never over another file.

    ``stem`` is reduced to a file name by :func:`output_stem` (``where`` names the input in its errors).
    When that file exists and ``overwrite`` is False, a numeric suffix is added
    as ComfyUI's save nodes do: ``name_00001.safetensors``, one more than the highest number there.
    ``source`` (the file being converted) is never the result: with ``overwrite`` it is refused
    (:class:`EDLoRAError`), without it it gets a suffix like any existing file.
    """
    base = output_stem(stem, where)
    path = os.path.join(folder, base + ".safetensors")
    if os.path.exists(path) and source is not None and os.path.exists(source) and os.path.samefile(path, source):
        if overwrite:
            raise EDLoRAError(f"{file_label(base)}.safetensors: the output would overwrite the file being converted; "
                              f"choose another output name")
    elif overwrite or not os.path.exists(path):
        return path
    numbered = re.compile(re.escape(base) + r"_(\d{5,})\.safetensors")
    taken = [int(m[1]) for f in os.listdir(folder) if (m := numbered.fullmatch(f))]
    return os.path.join(folder, f"{base}_{max(taken, default=0) + 1:05d}.safetensors")
