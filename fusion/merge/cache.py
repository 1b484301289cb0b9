"""The on-disk fusion cache and the digests its keys are made of. Plain Python/torch, no ComfyUI imports.

* :class:`FusionCache`: one file per entry (``<key>.fused``) in one folder, at most ``max_bytes`` in
  all, the least recently used entries evicted first (a hit refreshes the file's time). An entry that
  cannot be read or does not fit (corrupt, truncated, another format, wrong shapes, non-finite values)
  is a miss with a warning, never an error; the new result then overwrites it.
* Digests: :func:`tensors_digest` hashes every byte of every tensor (sha256, tensors hashed in
  parallel threads: hashlib releases the GIL); :func:`describe` turns model options / object patches
  (arbitrary Python objects) into a JSON-able description that is the same in every process (no
  addresses); :func:`code_version` is the versions of fusion.versions (the code version of a key).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import CellType
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

from ..log import log
from ..versions import BUNDLE_VERSION, RECORDING_VERSION, SOLVER_VERSION

T = TypeVar("T")

CACHE_SUFFIX = ".fused"
# Files of older releases (0.1.0: full-weight entries, per-concept text rows): evicted like entries.
_MANAGED_SUFFIXES = (CACHE_SUFFIX, ".rows")
_STALE_PART_S = 600.0  # a half-written entry older than this is left over from a crash
DEFAULT_MAX_BYTES = 2 << 30


# --------------------------------------------------------------------------- digests

def digest(*parts: Any) -> str:
    """sha256 over JSON-serialised parts (keys sorted)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> npt.NDArray[np.uint8]:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and every byte of its values."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t))  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ for Python >= 3.12 only
    return h.hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor], threads: int | None = None) -> dict[str, str]:
    """:func:`tensor_digest` of each named tensor, ``threads`` (default: all CPUs) at a time."""
    names = list(tensors)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(lambda k: tensor_digest(tensors[k]), names), strict=True))


def tensors_digest(tensors: Mapping[str, torch.Tensor], threads: int | None = None) -> str:
    """One digest of named tensors (names sorted), each hashed in full."""
    return digest(sorted(tensor_digests(tensors, threads).items()))


def describe(obj: Any, depth: int = 6) -> Any:
    """A JSON-able description of ``obj`` that is identical in every process for equal contents:
    tensors (and modules' state) by digest, containers element-wise, functions by module and qualified
    name plus what their closures and bound objects hold, other objects by class (with its bases: e.g.
    the v-prediction mix-in of ComfyUI's ModelSamplingAdvanced) and attributes. Never ``repr`` (it often
    holds an address); an object met twice is described once; ``depth`` bounds the nesting."""
    return _describe(obj, depth, set())


def _qualname(k: object) -> str:
    return f"{getattr(k, '__module__', '')}.{getattr(k, '__qualname__', getattr(k, '__name__', ''))}"


def _describe(obj: Any, depth: int, seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_digest(obj)}
    if depth < 0:
        return "..."
    if id(obj) in seen:
        return "<seen>"
    seen.add(id(obj))
    inner: Callable[[Any], Any] = lambda v: _describe(v, depth - 1, seen)  # noqa: E731
    if isinstance(obj, Mapping):
        return {str(k): inner(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [inner(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(inner(v), sort_keys=True, default=str) for v in obj)
    if isinstance(obj, type):
        return {"class": [_qualname(k) for k in obj.__mro__]}
    if inspect.ismethod(obj):
        return {"method": _qualname(obj.__func__), "self": inner(obj.__self__)}
    if inspect.isfunction(obj):
        cells = [c.cell_contents for c in (obj.__closure__ or ()) if _filled(c)]
        return {"function": _qualname(obj), "closure": [inner(c) for c in cells],
                "defaults": inner(obj.__defaults__ or ())}
    if inspect.isbuiltin(obj) or inspect.ismodule(obj):
        return {"builtin": _qualname(obj)}
    out: dict[str, Any] = {"class": [_qualname(k) for k in type(obj).__mro__]}
    if isinstance(obj, torch.nn.Module):
        out["state"] = tensors_digest(obj.state_dict())
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}
    else:
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    if attrs:
        out["attrs"] = inner(attrs)
    return out


def _filled(cell: CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - raises ValueError for an empty cell
        return True
    except ValueError:
        return False


def code_version(host_version: str, recording: int = RECORDING_VERSION, solver: int = SOLVER_VERSION) -> str:
    """The code version of a fusion-cache key: the recording and solver versions (fusion.versions), the bundle
    format entries are written in, and the host's version (ComfyUI's samplers and encoders do the recording)."""
    return digest("code", {"recording": recording, "solver": solver, "bundle": BUNDLE_VERSION}, host_version)


# Release 0.2.0 put a checksum of its recording and solving sources into its keys. Its recording and solve
# are version 1 of each, so its entries stay valid while both versions are 1: they are found under their old
# key and renamed to the new one (FusionCache.adopt).
_SOURCES_0_2_0 = "55f348821709b2d71811d603426ef671a21cc92189c005621a6c27baaced2def"


def legacy_code_versions(host_version: str) -> list[str]:
    """Code versions of earlier releases whose entries are still valid for this code."""
    if (RECORDING_VERSION, SOLVER_VERSION) == (1, 1):
        return [digest(_SOURCES_0_2_0, host_version)]
    return []


# --------------------------------------------------------------------------- the store

def max_bytes_from_env(value: str | None) -> int:
    """``MIXOFSHOW_FUSION_CACHE_MAX_MB`` (MiB; 0 = store nothing); unset or invalid: 2 GiB."""
    if value is None or not value.strip():
        return DEFAULT_MAX_BYTES
    try:
        mb = float(value)
    except ValueError:
        log.warning("Mix-of-Show: MIXOFSHOW_FUSION_CACHE_MAX_MB=%r is not a number; using 2048", value)
        return DEFAULT_MAX_BYTES
    return max(0, int(mb * (1 << 20)))


class FusionCache:
    """Fusion results on disk, by key (see the module text). Nothing is created until something is stored."""

    def __init__(self, folder: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = folder
        self.max_bytes = int(max_bytes)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + CACHE_SUFFIX)

    def load(self, key: str, read: Callable[[str], T]) -> T | None:
        """``read(path)`` of the entry, or None: no entry, or one ``read`` refused (any exception: logged
        as a warning; the entry will be overwritten)."""
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            value = read(path)
        except Exception as e:  # noqa: BLE001 - a bad entry is a miss, whatever is wrong with it
            log.warning("Mix-of-Show: fusion cache entry %s is unusable (%s); fusing again and replacing it",
                        os.path.basename(path), str(e)[:300])
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        return value

    def adopt(self, old_key: str, key: str) -> bool:
        """Rename an entry stored under an earlier release's key to ``key`` (see legacy_code_versions)."""
        old = self.path(old_key)
        if not os.path.isfile(old):
            return False
        try:
            os.replace(old, self.path(key))
        except OSError as e:
            log.warning("Mix-of-Show: could not rename the fusion cache entry %s (%s)", os.path.basename(old), e)
            return False
        return True

    def store(self, key: str, write: Callable[[str], None]) -> str | None:
        """Write an entry with ``write(path)`` (atomically: a temporary file, then renamed), then evict the
        least recently used entries beyond the cap. Returns the path, or None when it was not kept."""
        if self.max_bytes <= 0:
            return None
        os.makedirs(self.folder, exist_ok=True)
        path = self.path(key)
        tmp = f"{path}.{os.getpid()}.part"
        try:
            write(tmp)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("Mix-of-Show: could not write the fusion cache entry %s (%s)", path, e)
            if os.path.exists(tmp):
                os.remove(tmp)
            return None
        self.evict(keep=path)
        return path if os.path.exists(path) else None

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, size, path) of every managed file, oldest first."""
        out: list[tuple[float, int, str]] = []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return out
        for name in names:
            path = os.path.join(self.folder, name)
            part = name.endswith(".part") and time.time() - _mtime(path) > _STALE_PART_S
            if name.endswith(_MANAGED_SUFFIXES) or part:
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, path))
        return sorted(out)

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used files until the folder holds at most ``max_bytes``; ``keep`` goes
        last (and only when it alone is over the cap)."""
        entries = self.entries()
        entries.sort(key=lambda e: (e[2] == keep, e[0]))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)
            except OSError:
                continue
            total -= size
            removed.append(path)
            if path == keep:
                log.warning("Mix-of-Show: a fusion cache entry (%d MiB) is larger than the cache cap "
                            "(MIXOFSHOW_FUSION_CACHE_MAX_MB); it was not kept", size >> 20)
        return removed


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return time.time()
