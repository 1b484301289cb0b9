"""ED-LoRA files: reading (.pth and .safetensors), validation, the model family a file is for, and the flat
safetensors layout.

An ED-LoRA (docs/design.md §2.1, §13.2) holds per-layer token tables and LoRA factors for the text encoders and
the UNet of one model family, in diffusers module naming, in one of two key spellings:
``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` (Mix-of-Show ``main``, Concept Conductor) or
``<module>_lora.down.weight`` / ``<module>_lora.up.weight`` (``research_branch``). Each text encoder of the
family has its own table part and LoRA part (fusion.families: SD1.x ``new_concept_embedding`` /
``text_encoder``; SDXL adds ``new_concept_embedding_2`` / ``text_encoder_2`` for OpenCLIP-bigG).

Flat safetensors layout written by :func:`save_edlora` (metadata ``format=mixofshow-edlora``, ``base``,
``layers``)::

    <table part>.<token>                   [L, C]  (or [L, n, C] for n-vector tokens), per text encoder
    <text LoRA part>.<module>.lora_down.weight [r, in]   (text_encoder, text_encoder_2)
    <text LoRA part>.<module>.lora_up.weight   [out, r]
    unet.<module>.lora_down.weight         [r, in] or [r, in, 1, 1]
    unet.<module>.lora_up.weight           [out, r] or [out, r, 1, 1]

The family is recognised from the content (:func:`fusion.families.recognise_file`): the tables' row count,
parts only one family has, the context width of cross-attention LoRAs, UNet modules only one family has. A
file whose markers point to two families, or to none, is refused (:class:`ModelFamilyError`).

Files are untrusted (:mod:`fusion.files.filecheck`): a ``.pth`` is only read with
``torch.load(weights_only=True)``, every tensor is checked (float dtype, shape, finite), and every
error is an :class:`EDLoRAError` naming the file, the key and what was expected.

What is refused and what is only warned about:

* **Refused** — anything inside the parts that cannot be applied exactly as the trainer meant: a token that
  is not ``<name>``, a table that is not ``[L, C]`` / ``[L, n, C]`` for its encoder, a token without a table
  in every encoder of the family, a key in a LoRA part that is not a LoRA factor in one of the two spellings
  (e.g. an ``alpha``), a module outside the family's text encoders / UNet transformer blocks, a lone or
  duplicated factor, a part that is not a dict, a non-string key inside a part, at the top level or inside
  ``params`` (nothing says what an int or a boolean key would mean); an XTI file with a key beside its layer
  keys; any bad tensor.
* **Ignored with one warning** — entries beside the parts, as training checkpoints carry them
  (``optimizer``, ``step``, ``epoch``, flat keys of other prefixes). They are
  listed in :attr:`EDLoRA.ignored_keys` so nodes can show them. A part that is ``None`` counts as
  absent.
* **Loaded with a warning** (:attr:`EDLoRA.warnings`) — a later encoder's table whose rows look untrained
  (unrelated random rows beside related rows of the first encoder's table: Concept Conductor's trainer
  leaves bigG tables so, docs/design.md §13.2).
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

from ..errors import EDLoRAError, ModelFamilyError
from ..families import FAMILIES, SD15, ModelFamily, TextEncoder, recognise_file
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
_UNET_PART = "unet"
_TABLE_PARTS = tuple(dict.fromkeys(e.table_part for f in FAMILIES for e in f.text_encoders))
_LORA_PARTS = tuple(dict.fromkeys(e.lora_part for f in FAMILIES for e in f.text_encoders)) + (_UNET_PART,)
_PARTS = _TABLE_PARTS + _LORA_PARTS
# a later encoder's token rows "look untrained" when their mean pairwise cosine is below this while the first
# encoder's rows of the same token are related above _RELATED (independent random rows in 768+ dimensions
# have |cos| ~ 0.03; rows trained from one initial vector stay near 1)
_UNRELATED, _RELATED = 0.2, 0.5
_KEY_SPELLINGS = (  # main branch, research_branch
    re.compile(r"^(.+)\.lora_(down|up)\.weight$"),
    re.compile(r"^(.+)_lora\.(down|up)\.weight$"),
)


def _table_rule(family: ModelFamily, encoder: TextEncoder) -> str:
    rows, width = family.layer_count, encoder.width
    which = f" ({encoder.table_part})" if len(family.text_encoders) > 1 else ""
    return (f"an {family.label} ED-LoRA token table{which} is [{rows}, {width}] (one row per cross-attention "
            f"layer), or [{rows}, n, {width}] for n vectors")


Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EDLoRA:
    """One ED-LoRA in memory for ``family``.

    ``tables``: text encoder name (``clip_l``, ``clip_g``) -> token -> ``[L, n, width]`` table, one per
    encoder of the family, every encoder with the same tokens; ``text``: text encoder name -> diffusers module
    -> ``(up, down)``; ``unet``: diffusers module -> ``(up, down)``.

    ``ignored_keys``: the first :data:`MAX_IGNORED_KEPT` file entries that were not loaded (shown as
    in messages); ``ignored_total`` counts them all. ``warnings``: what was loaded but looks wrong.
    """

    name: str
    tables: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    text: dict[str, dict[str, Pair]] = field(default_factory=dict)
    unet: dict[str, Pair] = field(default_factory=dict)
    digest: str = ""
    family: ModelFamily = SD15
    ignored_keys: tuple[str, ...] = ()
    ignored_total: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def embeddings(self) -> dict[str, torch.Tensor]:
        """token -> table of the family's first text encoder (an SD1.x file's only tables)."""
        return self.tables.get(self.family.text_encoders[0].name, {})

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
        for warning in edlora.warnings:
            log.warning("Mix-of-Show: %s", warning)
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
                                  + ("token -> tensor" if key in _TABLE_PARTS else "LoRA factor name -> tensor"))
            for rest, item in value.items():
                if not isinstance(rest, str):
                    raise EDLoRAError(f"{r.name}: {shown(key)} has the key {shown(rest)}; expected "
                                      + ("tokens like <name>" if key in _TABLE_PARTS else "LoRA factor names"))
                put(key, rest, item)
        else:
            part, dot, rest = key.partition(".")
            if part in _PARTS and dot:
                put(part, rest, value)
            else:
                r.ignore(key)
    return parts


def _factor_keys(part: str, flat: dict[str, object], r: _Reader) -> dict[str, dict[str, object]]:
    """module -> {"up": value, "down": value} of a LoRA part, in either key spelling."""
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
    return factors


def _split_lora_factors(r: _Reader, part: str, flat: dict[str, object], family: ModelFamily) -> dict[str, Pair]:
    encoder = family.text_encoder_of(lora_part=part)
    out = {}
    for module, pair in _factor_keys(part, flat, r).items():
        where = shown(f"{part}.{module}")
        if set(pair) != {"up", "down"}:
            raise EDLoRAError(f"{r.name}: {where} has only a lora {'/'.join(pair)} factor")
        if encoder is not None:
            if not encoder.is_lora_module(module):
                raise EDLoRAError(f"{r.name}: {where} is not a linear of {family.label}'s {encoder.name} text encoder")
        elif not family.has_unet_module(module):
            raise EDLoRAError(f"{r.name}: {where} is not a transformer-block module of the {family.label} UNet")
        up = r.tensor(f"{part}.{module}.lora_up.weight", pair["up"], ndim=(2, 4))
        down = r.tensor(f"{part}.{module}.lora_down.weight", pair["down"], ndim=(2, 4))
        if down.ndim != up.ndim or up.shape[1] != down.shape[0] or up.shape[2:] != down.shape[2:] \
                or up.shape[2:] not in ((), (1, 1)):
            raise EDLoRAError(f"{r.name}: {where} factors have incompatible shapes up {list(up.shape)} @ down "
                              f"{list(down.shape)} (expected [out, r] @ [r, in], or [out, r, 1, 1] @ [r, in, 1, 1])")
        check_lora_change(r.name, f"{part}.{module}", up, down)
        if encoder is not None and not module.endswith("fc2") and down.shape[1] != encoder.width:
            raise ModelFamilyError(f"{r.name}: text-encoder LoRA {where} takes {down.shape[1]} inputs; an "
                                   f"{family.label} ED-LoRA's {encoder.name} text encoder is {encoder.width}-wide")
        out[module] = (up, down)
    return out


def _check_token(r: _Reader, token: str) -> None:
    if len(token) > MAX_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
        raise EDLoRAError(f"{r.name}: concept token {shown(token)} must look like <name> (angle brackets, no "
                          f"spaces, at most {MAX_TOKEN_CHARS} characters)")


def _width_hint(width: int, encoder: TextEncoder) -> str:
    """What a table of another width is likely for (SD2.x's text encoder is 1024 wide: no family here)."""
    others = sorted({f.label for f in FAMILIES for e in f.text_encoders if e.width == width and e != encoder})
    if others:
        return f" — {width}-wide rows are for {' or '.join(others)}"
    return f" — {width}-wide rows are for no text encoder this pack knows (SD2.x's are 1024 wide)"


def _check_table(r: _Reader, table: object, key: str, family: ModelFamily = SD15,
                 encoder: TextEncoder | None = None) -> torch.Tensor:
    encoder = encoder or family.text_encoders[0]
    rows, width = family.layer_count, encoder.width
    shape = tuple(table.shape) if torch.is_tensor(table) else ()
    rule = _table_rule(family, encoder)
    try:
        t = r.tensor(key, table, shapes=[(rows, width), (rows, None, width)], expected=rule)
    except EDLoRAError as e:
        if len(shape) in (2, 3) and shape[-1] not in (width, 0):  # rows of another width: another base model
            raise ModelFamilyError(f"{e}{_width_hint(shape[-1], encoder)}") from None
        raise
    t = t if t.ndim == 3 else t.unsqueeze(1)
    if t.shape[1] > MAX_VECTORS_PER_TOKEN:
        raise EDLoRAError(f"{r.name}: {shown(key)} has {t.shape[1]} vectors per layer; a prompt chunk holds at most "
                          f"{MAX_VECTORS_PER_TOKEN}")
    return t


def _xti_hint(state: object) -> str:
    if not isinstance(state, dict):
        return ""
    for family in FAMILIES:
        present = [k for k in family.xti_keys if k in state]
        if present:
            missing = [k for k in family.xti_keys if k not in state]
            return (f"; it has {len(present)} of the {len(family.xti_keys)} XTI layer keys (missing "
                    f"{', '.join(missing)}), so it is not an XTI embedding either")
    return ""


def _shape(value: object) -> tuple[int, ...]:
    return tuple(value.shape) if torch.is_tensor(value) else ()


def _family_of_parts(r: _Reader, parts: dict[str, dict[str, object]]) -> ModelFamily:
    """The family a file's parts are for (:func:`fusion.families.recognise_file`), or a ModelFamilyError."""
    tables = {p: {tok: _shape(v) for tok, v in parts[p].items()} for p in _TABLE_PARTS if p in parts}
    loras = {p: {m: _shape(f.get("down")) for m, f in _factor_keys(p, parts[p], r).items()}
             for p in _LORA_PARTS if p in parts}
    found, markers = recognise_file(tables, loras)
    if len(found) == 1:
        return found[0]
    if found:
        said = "; ".join(f"{', '.join(markers[f.name][:2])} ({f.label})" for f in found)
        raise ModelFamilyError(f"{r.name}: inconsistent ED-LoRA — its content points to {len(found)} model "
                               f"families: {said}; a file is made for one")
    seen = sorted({str(list(s)) for part in tables.values() for s in part.values()})
    expected = "; ".join(f"{f.label}: " + " and ".join(f"[{f.layer_count}, {e.width}]" for e in f.text_encoders)
                         for f in FAMILIES)
    raise ModelFamilyError(f"{r.name}: an ED-LoRA for no model family this pack knows: its token tables are "
                           f"{', '.join(seen[:3])}; the tables of each family are {expected}")


def _relatedness(table: torch.Tensor) -> float:
    """Mean pairwise cosine between a ``[L, n, C]`` table's layer rows (1 for identical rows, ~0 for unrelated)."""
    rows = torch.nn.functional.normalize(table.transpose(0, 1).double(), dim=-1)  # [n, L, C]
    count = rows.shape[1]
    if count < 2:
        return 1.0
    cos = rows @ rows.transpose(1, 2)
    return float((cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)).mean() / (count * (count - 1)))


def _untrained_tables(r: _Reader, family: ModelFamily, tables: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Warnings for later encoders' tables whose rows look untrained (see the module text)."""
    first = family.text_encoders[0]
    out = []
    for e in family.text_encoders[1:]:
        tokens = [t for t, table in tables[e.name].items()
                  if _relatedness(table) < _UNRELATED and _relatedness(tables[first.name][t]) > _RELATED]
        if tokens:
            out.append(f"{r.name}: the {e.name} rows ('{e.table_part}') of {' '.join(tokens)} look untrained "
                       f"({family.layer_count} unrelated random rows, while its {first.name} rows are related), as "
                       f"Concept Conductor's trainer can leave them; they are used as they are")
    return out


def parse_edlora(state: dict[Any, Any], name: str, family: ModelFamily | None = None) -> EDLoRA:
    """Validate a loaded state dict (nested, ``params``-wrapped or flat) and return an :class:`EDLoRA`.

    The family is recognised from the content unless given. Token tables are normalised to ``[L, n, C]``
    float32 (the family's L layers and each encoder's C-wide rows; n vectors per token, ED-LoRA has n = 1),
    LoRA factors to float32. Raises :class:`EDLoRAError` (module docstring: what is refused, what is ignored
    with a warning).
    """
    with _named(name):
        r = _Reader(name)
        parts = _gather_parts(state, r)
        if not parts:
            keys = ", ".join(shown(k, 40) for k in itertools.islice(state, 6))
            raise EDLoRAError(f"{r.name}: not an ED-LoRA — no 'new_concept_embedding', 'text_encoder' or 'unet' part "
                              f"(top-level keys: {keys or 'none'}){_xti_hint(state)}")
        for part in _TABLE_PARTS:
            for tok in parts.get(part, {}):
                _check_token(r, tok)
        if not any(parts.get(part) for part in _TABLE_PARTS):
            raise EDLoRAError(f"{r.name}: defines no concept token (empty 'new_concept_embedding')")
        family = family or _family_of_parts(r, parts)
        own = {e.table_part for e in family.text_encoders} | {e.lora_part for e in family.text_encoders} | \
            {_UNET_PART}
        foreign = [p for p in parts if p not in own]
        if foreign:
            raise ModelFamilyError(f"{r.name}: an {family.label} ED-LoRA has no '{foreign[0]}' part")
        tables = {e.name: {tok: _check_table(r, t, f"{e.table_part}.{tok}", family, e)
                           for tok, t in parts.get(e.table_part, {}).items()} for e in family.text_encoders}
        for e in family.text_encoders:
            missing = [t for f in family.text_encoders for t in tables[f.name] if t not in tables[e.name]]
            if missing:
                raise ModelFamilyError(f"{r.name}: inconsistent tables: {missing[0]} has no '{e.table_part}' table "
                                       f"({e.name} rows); an {family.label} ED-LoRA has one table per text encoder "
                                       f"for every token")
        edlora = EDLoRA(name=name, tables=tables, family=family,
                        text={e.name: _split_lora_factors(r, e.lora_part, parts.get(e.lora_part, {}), family)
                              for e in family.text_encoders},
                        unet=_split_lora_factors(r, _UNET_PART, parts.get(_UNET_PART, {}), family),
                        warnings=tuple(_untrained_tables(r, family, tables)))
        return r.finish(edlora)


def _xti_family(state: object) -> ModelFamily | None:
    """The family of a kohya XTI (P+) embedding: all of its layer keys (IN01..OUT11) and no ED-LoRA part."""
    if not isinstance(state, dict) or any(
            isinstance(k, str) and (k in _PARTS or k == "params" or k.partition(".")[0] in _PARTS) for k in state):
        return None
    return next((f for f in FAMILIES if f.xti_keys and all(k in state for k in f.xti_keys)), None)


def parse_xti(state: dict[Any, Any], name: str, token: str, family: ModelFamily = SD15) -> EDLoRA:
    """A kohya XTI (P+) embedding: one key per layer (IN01..OUT11), each ``[n, C]``, becomes one token table.

    Any other entry is refused (kohya writes exactly the layer keys).
    """
    with _named(name):
        r = _Reader(name)
        _check_token(r, token)
        keys, encoder = family.xti_keys, family.text_encoders[0]
        if not isinstance(state, dict) or not keys or not all(k in state for k in keys):
            raise EDLoRAError(f"{r.name}: not an XTI embedding (expected the keys {', '.join(keys)})")
        rows = [r.tensor(k, state[k], shapes=[(None, encoder.width)],
                         expected=f"an {family.label} XTI layer is [n, {encoder.width}]") for k in keys]
        if any(row.shape != rows[0].shape for row in rows):
            shapes = sorted({str(list(row.shape)) for row in rows})
            raise EDLoRAError(f"{r.name}: XTI layers must all have one shape [n, {encoder.width}]; found "
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
        return r.finish(EDLoRA(name=name, tables={encoder.name: {token: table}}, family=family))


def load_edlora(path: str) -> EDLoRA:
    """Load an ED-LoRA or a kohya XTI embedding file from disk (never running pickled code); the family is
    recognised from its content.

    A fused bundle (metadata ``format=mixofshow-fused-bundle``) is refused: it loads as a bundle.
    """
    name = os.path.basename(path)
    with _named(name):
        state, meta = read_state_dict(path)
        if meta.get("format") == BUNDLE_FORMAT:
            raise EDLoRAError(f"{file_label(name)}: a fused ED-LoRA bundle (format={BUNDLE_FORMAT}), not a single "
                              f"ED-LoRA: a bundle is loaded whole (fused weights and concepts), never as an ED-LoRA")
        xti = _xti_family(state)
        if xti is not None:
            stem = re.sub(r"[^A-Za-z0-9_\-.]", "_", os.path.splitext(name)[0])
            if len(stem) > MAX_TOKEN_CHARS - 2:  # cut, it would not be the name a user types
                raise EDLoRAError(f"{file_label(name)}: an XTI embedding's token is its file name, <{stem[:240]}>, "
                                  f"which is {len(stem)} characters long; rename the file to at most "
                                  f"{MAX_TOKEN_CHARS - 2} characters (tokens are at most {MAX_TOKEN_CHARS} with the "
                                  f"brackets)")
            edlora = parse_xti(state, name, f"<{stem}>", xti)
        else:
            edlora = parse_edlora(state, name)
        said = meta.get("base") if meta.get("format") == EDLORA_FORMAT else None
        if said is not None and said != edlora.family.name:
            raise ModelFamilyError(f"{file_label(name)}: its metadata says base={shown(said)}, but its content is an "
                                   f"{edlora.family.label} ED-LoRA")
        edlora.digest = file_digest(path)
        return edlora


def to_flat_state_dict(edlora: EDLoRA) -> dict[str, torch.Tensor]:
    """The flat safetensors layout (module docstring); single-vector tables are stored as [L, C]."""
    flat = {}
    encoders = edlora.family.text_encoders
    for e in encoders:
        for tok, table in edlora.tables.get(e.name, {}).items():
            flat[f"{e.table_part}.{tok}"] = (table[:, 0] if table.shape[1] == 1 else table).contiguous()
    parts = [(e.lora_part, edlora.text.get(e.name, {})) for e in encoders] + [(_UNET_PART, edlora.unet)]
    for part, factors in parts:
        for module, (up, down) in factors.items():
            flat[f"{part}.{module}.lora_up.weight"] = up.contiguous()
            flat[f"{part}.{module}.lora_down.weight"] = down.contiguous()
    return flat


def save_edlora(edlora: EDLoRA, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the flat safetensors layout (via a ``.part`` file, so a failed write leaves no half file)."""
    meta = {"format": EDLORA_FORMAT, "version": EDLORA_FORMAT_VERSION, "tokens": " ".join(edlora.tokens),
            "base": edlora.family.name, "layers": str(edlora.family.layer_count)}
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
