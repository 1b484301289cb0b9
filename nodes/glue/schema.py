"""What every node family shares: the V3 node base class and schema helpers.

Node ids (``MixOfShow...``) and input names are forever: saved workflows and API prompts use them.
New inputs are always optional, so that prompts written against an older release still validate.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from comfy_api.latest import io

from ..names import SEARCH_ALIASES_ATTR

_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


class PackNode(io.ComfyNode):
    """Base of the pack's nodes: search aliases reach the node definition on every ComfyUI.

    Newer ComfyUI releases have ``Schema.search_aliases``; on older ones (0.3.75) the aliases are
    added to the served definition here, where newer frontends (1.58) read them."""

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:
        info = super().GET_NODE_INFO_V1()
        aliases = getattr(cls.GET_SCHEMA(), SEARCH_ALIASES_ATTR, ())
        if aliases and not info.get("search_aliases"):
            info["search_aliases"] = list(aliases)
        return info


def schema(cls: type[PackNode], *, search_aliases: tuple[str, ...] = (), **fields) -> io.Schema:
    """``io.Schema(**fields)`` plus the node's search aliases (passed natively where supported).
    (Node classes are locked while ComfyUI runs them: nothing is stored on ``cls``.)"""
    if "search_aliases" in _SCHEMA_FIELDS:
        fields["search_aliases"] = list(search_aliases)
    result = io.Schema(**fields)
    setattr(result, SEARCH_ALIASES_ATTR, tuple(search_aliases))
    return result


def advanced(inp: io.Input) -> io.Input:
    """Marks an input as rarely changed: newer frontends fold it away (``advanced``); older ones ignore it."""
    inp.advanced = True  # the attribute newer ComfyUI releases serialise themselves
    inp.extra_dict = {**inp.extra_dict, "advanced": True}
    return inp


def check_choices(cls: type[io.ComfyNode], **values) -> bool | str:
    """``validate_inputs`` for combo inputs: ComfyUI 0.3.75 does not check a V3 combo's value against its
    options itself, so a missing file or a misspelt sampler would only fail at run time. A linked input
    (value not known yet) passes."""
    options = {i.id: i.options for i in cls.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        choices = options.get(name)
        if value is None or choices is None or value in choices:
            continue
        more = f", … ({len(choices)} in all)" if len(choices) > 20 else ""
        listed = ", ".join(repr(c) for c in choices[:20]) + more
        return (f"'{str(value)[:200]}' is not one of the choices ({listed or 'none: the folder is empty'}) — for a "
                f"model: is the file in the right models folder?")
    return True
