"""A context tensor that carries its 16 layer-wise contexts through stock conditioning edits.

A concept prompt's CONDITIONING tensor is a :class:`LayerwiseContext`: to every stock node and to
ComfyUI's sampling code it is the ordinary ``[B, T, C]`` context of layer 0, and it carries the
``[B, L, T, C]`` stack of all L = 16 layers. The tensor operations stock conditioning nodes and
ComfyUI's batching use are applied to the stack too, with the layer axis kept out of the way:

* element-wise arithmetic (Conditioning Average: ``to·s + from·(1−s)``), ``*_like`` constructors
  (Conditioning Zero Out), copies, dtype/device moves;
* ``cat`` (Conditioning Concat; ComfyUI's cond batching), ``repeat`` / ``narrow`` / ``expand`` and
  slicing on the batch and token axes (token padding, batch repeats).

A plain ``[B, T, C]`` operand counts as the same context in every layer. Any other operation gives a
plain tensor (e.g. the projections inside a ControlNet), so nothing downstream ever sees the stack by
accident. In-place operations outside that list drop the stack (the tensor then acts as its edited
layer-0 context everywhere) and say so in the log, once.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..log import log

_ELEMENTWISE = {
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.lerp, torch.where, torch.neg, torch.abs, torch.clamp, torch.clip, torch.nan_to_num,
    Tensor.add, Tensor.sub, Tensor.mul, Tensor.div, Tensor.lerp, Tensor.neg, Tensor.abs, Tensor.clamp,
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__,
    Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__neg__,
    Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.double, Tensor.type,
    Tensor.clone, Tensor.detach, Tensor.contiguous,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.clone,
}
_INPLACE: dict[Callable[..., Any], Callable[..., Any]] = {
    Tensor.add_: Tensor.add_, Tensor.sub_: Tensor.sub_, Tensor.mul_: Tensor.mul_, Tensor.div_: Tensor.div_,
    Tensor.__iadd__: Tensor.add_, Tensor.__isub__: Tensor.sub_, Tensor.__imul__: Tensor.mul_,
    Tensor.__itruediv__: Tensor.div_, Tensor.zero_: Tensor.zero_, Tensor.fill_: Tensor.fill_,
    Tensor.clamp_: Tensor.clamp_, Tensor.lerp_: Tensor.lerp_,
}
_READ_ONLY = {Tensor.__repr__, Tensor.__format__, Tensor.__len__, Tensor.dim, Tensor.size, Tensor.numel,
              Tensor.element_size, Tensor.__bool__}
_warned_drop = False


class LayerwiseContext(Tensor):
    """``[B, T, C]`` layer-0 context carrying ``layers``: ``[B, L, T, C]`` (see the module text)."""

    layers: Tensor | None

    @staticmethod
    def __new__(cls, layers: Tensor) -> LayerwiseContext:
        if layers.dim() != 4:
            raise ValueError(f"layer-wise contexts must be [B, L, T, C], got {tuple(layers.shape)}")
        obj = Tensor._make_subclass(cls, layers[:, 0].clone(), False)  # own storage: in-place edits apply once
        obj.layers = layers
        return obj

    def __init__(self, layers: Tensor):  # the work is in __new__
        pass

    def plain(self) -> Tensor:
        """The layer-0 context as an ordinary tensor."""
        return self.as_subclass(Tensor)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*_map(args, _plain), **_map(kwargs, _plain))
        if func is Tensor.__setitem__:
            _setitem(args)
            return out
        if func is Tensor.__deepcopy__ and args[0].layers is not None:
            return _wrap(out, copy.deepcopy(args[0].layers, args[1] if len(args) > 1 else None))
        if func in _READ_ONLY or not isinstance(out, Tensor):
            return out
        if func in _INPLACE:
            return _inplace(func, args, kwargs)
        layers = _layers_result(func, args, kwargs, out)
        if layers is None:
            return out
        return _wrap(out, layers)


def _plain(x: Any) -> Any:
    return x.as_subclass(Tensor) if isinstance(x, LayerwiseContext) else x


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _layer_count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    found: list[int] = []

    def visit(x: Any) -> Any:
        if isinstance(x, LayerwiseContext) and x.layers is not None:
            found.append(x.layers.shape[1])
        return x

    _map(args, visit)
    _map(kwargs, visit)
    return max(found) if found else None


def _lift(x: Any, count: int | None = None) -> Any:
    """An operand in stack form: a layer-wise context's stack; a plain 3-D context as the same context in
    every layer (``[B, 1, T, C]``, or expanded to ``count`` layers); anything else unchanged."""
    if isinstance(x, LayerwiseContext):
        if x.layers is None:
            x = x.plain()
        else:
            return x.layers
    if isinstance(x, Tensor) and x.dim() == 3:
        x = x.unsqueeze(1)
        return x if count is None else x.expand(-1, count, -1, -1)
    return x


def _stack_dim(dim: int) -> int:
    """A dim of the ``[B, T, C]`` view as a dim of the ``[B, L, T, C]`` stack."""
    d = dim % 3
    return 0 if d == 0 else d + 1


def _layers_result(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   out: Tensor) -> Tensor | None:
    count = _layer_count(args, kwargs)
    if count is None or out.dim() != 3:
        return None
    try:
        if func in _ELEMENTWISE:
            layers = func(*_map(args, _lift), **_map(kwargs, _lift))
        elif func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            layers = torch.cat([_lift(t, count) for t in tensors], dim=_stack_dim(dim))
        elif func is Tensor.__getitem__:
            layers = _getitem(args[0].layers, args[1])
        elif func is Tensor.repeat:
            sizes = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple, torch.Size)) else args[1]
            b, t, c = (int(s) for s in sizes)
            layers = args[0].layers.repeat(b, 1, t, c)
        elif func is Tensor.expand:
            sizes = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple, torch.Size)) else args[1]
            b, t, c = (int(s) for s in sizes)
            layers = args[0].layers.expand(b, -1, t, c)
        elif func in (Tensor.narrow, torch.narrow):
            dim, start, length = (list(args[1:]) + [kwargs.get(k) for k in ("dim", "start", "length")])[:3]
            layers = args[0].layers.narrow(_stack_dim(dim), start, length)
        else:
            return None
    except Exception:  # noqa: BLE001 - an operand layout this rule does not cover: plain result
        return None
    if not isinstance(layers, Tensor) or layers.dim() != 4 or layers.shape[0] != out.shape[0] \
            or tuple(layers.shape[2:]) != tuple(out.shape[1:]):
        return None
    return layers


def _getitem(layers: Tensor, index: Any) -> Tensor:
    index = index if isinstance(index, tuple) else (index,)
    if not index or any(i is Ellipsis or i is None for i in index) or isinstance(index[0], int):
        raise IndexError("not a batch/token slice")
    return layers[(index[0], slice(None)) + index[1:]]


def _wrap(out: Tensor, layers: Tensor) -> LayerwiseContext:
    obj = Tensor._make_subclass(LayerwiseContext, out, False)
    obj.layers = layers
    return obj


def _drop_layers(target: LayerwiseContext) -> None:
    global _warned_drop
    target.layers = None
    if not _warned_drop:
        _warned_drop = True
        log.warning("Mix-of-Show: an in-place edit of a concept prompt's context could not be applied to its "
                    "16 layer-wise contexts; that prompt now uses its edited layer-0 context in every layer")


def _inplace(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    target = args[0]
    if target.layers is not None:
        try:
            _INPLACE[func](target.layers, *_map(args[1:], _lift), **_map(kwargs, _lift))
        except Exception:  # noqa: BLE001
            _drop_layers(target)
    return target


def _setitem(args: tuple[Any, ...]) -> None:
    target, index, value = args[0], args[1], args[2]
    if not isinstance(target, LayerwiseContext) or target.layers is None:
        return
    try:
        view = _getitem(target.layers, index)
        view.copy_(_lift(value).expand_as(view) if isinstance(value, Tensor) else torch.full_like(view, value))
    except Exception:  # noqa: BLE001
        _drop_layers(target)


def layers_of(context: object) -> Tensor | None:
    """The ``[B, L, T, C]`` stack a context carries, or None for a plain context."""
    return context.layers if isinstance(context, LayerwiseContext) else None
