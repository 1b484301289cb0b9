"""The model-family profile: what a family of base models is, for the pack (see the package text).

Names used throughout:

* *layer* ``l``: the ``l``-th cross-attention (attn2) of the UNet in run order — input blocks by id,
  the middle block, output blocks by id, and inside a SpatialTransformer its transformer blocks by index.
  It is also the row ``l`` of an ED-LoRA token table and the copy ``l`` of a layer-wise prompt.
* *layer key*: how ComfyUI tells a patch where it is: ``extra_options["block"]`` is ``(name, id)`` and
  ``extra_options["block_index"]`` the transformer block inside the SpatialTransformer; attn2 replace
  patches are keyed ``(name, id, block_index)``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

LayerKey = tuple[str, int, int]  # ComfyUI's (block name, block id, transformer block index)

_TEXT_MODULE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class SpatialTransformer:
    """One SpatialTransformer of the UNet (the home of ``depth`` cross-attention layers)."""
    block: tuple[str, int]   # ComfyUI's extra_options["block"], e.g. ("input", 1)
    ldm: str                 # its module in ComfyUI's (ldm) UNet, e.g. "input_blocks.1.1"
    diffusers: str           # its module in diffusers naming (ED-LoRA files), e.g. "down_blocks.0.attentions.0"
    channel_mult: int        # its width / the UNet's model_channels
    depth: int = 1           # transformer blocks inside it


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of the family's CLIP."""
    name: str                # its attribute on ComfyUI's cond_stage_model ("clip_l")
    width: int               # hidden width = width of its token-table rows
    table_part: str          # the ED-LoRA file part with its token tables ("new_concept_embedding")
    lora_part: str           # the ED-LoRA file part with its LoRA factors ("text_encoder")
    comfy_lora_prefix: str   # ComfyUI's diffusers-LoRA key prefix for it ("text_encoder.")
    tokenizer_key: str       # its token stream in ComfyUI's tokenizer output ("l" of {"l": [...]})
    kohya_prefix: str        # its modules' prefix in kohya LoRA files ("lora_te_"; SDXL: "lora_te1_", "lora_te2_")

    @staticmethod
    def is_lora_module(name: str) -> bool:
        """True for the CLIP linears an ED-LoRA may carry (q/k/v/out_proj, fc1, fc2 of a layer)."""
        return _TEXT_MODULE.match(name) is not None


@dataclass(frozen=True)
class ModelFamily:
    """Everything family-specific (see the module text). One instance per family."""
    name: str                                   # stored in files and caches ("sd15")
    label: str                                  # shown to people ("SD1.x")
    transformers: tuple[SpatialTransformer, ...]  # in UNet run order
    context_dim: int                            # width of the context every attn2 reads
    text_encoders: tuple[TextEncoder, ...]      # in the order their outputs are concatenated into the context
    xti_keys: tuple[str, ...]                   # kohya XTI (P+) embedding keys, one per layer
    default_size: tuple[int, int]               # (width, height) in pixels the family is trained at
    model_channels: int                         # the full-size UNet's model_channels
    size_conditioning: bool = False             # the UNet reads the image size (SDXL's time ids in ``y``)
    kohya_unet_ldm_names: bool = False          # kohya names its UNet LoRA modules in ldm layout (SDXL:
    #                                             lora_unet_input_blocks_4_1_…), not diffusers' (SD1.x)

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # ---- layers
    @cached_property
    def layers(self) -> tuple[LayerKey, ...]:
        """ComfyUI's key of every cross-attention layer, in run order (= table row order)."""
        return tuple((t.block[0], t.block[1], j) for t in self.transformers for j in range(t.depth))

    @property
    def layer_count(self) -> int:
        """Cross-attention layers = rows of a token table = copies of a layer-wise prompt."""
        return len(self.layers)

    @cached_property
    def _layer_index(self) -> dict[LayerKey, int]:
        return {key: i for i, key in enumerate(self.layers)}

    def layer_of(self, block: Any, block_index: Any = 0) -> int | None:
        """The layer at ComfyUI's ``extra_options["block"]`` / ``["block_index"]``, else None."""
        try:
            name, number = block
            return self._layer_index.get((str(name), int(number), int(block_index or 0)))
        except (TypeError, ValueError):
            return None

    @property
    def text_width(self) -> int:
        """Width of the first text encoder's token rows (the ED-LoRA table of a single-encoder family)."""
        return self.text_encoders[0].width

    def text_encoder_of(self, *, table_part: str = "", lora_part: str = "", tokenizer_key: str = "") \
            -> TextEncoder | None:
        """The text encoder whose ED-LoRA table part, LoRA part or token stream this is, else None."""
        for e in self.text_encoders:
            if (table_part and e.table_part == table_part) or (lora_part and e.lora_part == lora_part) \
                    or (tokenizer_key and e.tokenizer_key == tokenizer_key):
                return e
        return None

    # ---- module names
    def ldm_unet_module(self, diffusers_name: str) -> str:
        """``down_blocks.0.attentions.1.proj_in`` -> ``input_blocks.2.1.proj_in``: a module inside one of the
        family's SpatialTransformers, renamed from diffusers to ComfyUI's layout. KeyError for any other."""
        for t in self.transformers:
            if diffusers_name.startswith(t.diffusers + "."):
                return t.ldm + diffusers_name[len(t.diffusers):]
        raise KeyError(diffusers_name)

    def layer_of_weight(self, model_key: str) -> int | None:
        """The layer of a MODEL state-dict key (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2
        .to_k.weight``): the first layer of the SpatialTransformer holding it (its own layer when the key is
        inside ``transformer_blocks.j``), else None."""
        path = model_key.removeprefix("diffusion_model.")
        first = 0
        for t in self.transformers:
            prefix = t.ldm + "."
            if path.startswith(prefix):
                m = re.match(r"transformer_blocks\.(\d+)\.", path[len(prefix):])
                j = int(m[1]) if m else 0
                return first + j if j < t.depth else None
            first += t.depth
        return None

    def has_unet_module(self, diffusers_name: str) -> bool:
        """A diffusers-named module inside one of the family's SpatialTransformers (and inside one of its
        transformer blocks when the name has ``transformer_blocks.j``)."""
        try:
            return self.layer_of_weight(self.ldm_unet_module(diffusers_name) + ".weight") is not None
        except KeyError:
            return False

    # ---- recognition
    def file_markers(self, tables: Mapping[str, Mapping[str, tuple[int, ...]]],
                     loras: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
        """What in an ED-LoRA file's content fits this family, described for messages. ``tables``: table part ->
        token -> table shape; ``loras``: LoRA part -> module -> shape of its down factor. A marker is one of:
        token tables with one row per cross-attention layer, a part only a family with its text encoders has,
        a cross-attention k/v LoRA reading a context of its width, a UNet module it has (fusion.families
        .recognise_file keeps only the markers that tell families apart)."""
        out = []
        rows = sorted({shape[0] for part in tables.values() for shape in part.values() if shape})
        if self.layer_count in rows:
            out.append(f"{self.layer_count}-row token tables")
        out += [f"a '{part}' part" for part in list(tables) + list(loras)
                if self.text_encoder_of(table_part=part, lora_part=part) is not None]
        unet = loras.get("unet", {})
        reads: dict[int, str] = {}
        for m, shape in sorted(unet.items()):
            if m.endswith(("attn2.to_k", "attn2.to_v")) and len(shape) > 1:
                reads.setdefault(shape[1], m)
        if self.context_dim in reads:
            out.append(f"a cross-attention LoRA reading a {self.context_dim}-wide context "
                       f"({reads[self.context_dim]})")
        out += [f"the UNet module {m}" for m in sorted(unet) if self.has_unet_module(m)]
        return out

    def describes_unet(self, context_dim: object, cross_attention_layers: int) -> bool:
        """A UNet of this family: its attn2 context width and number of cross-attention layers."""
        return context_dim == self.context_dim and cross_attention_layers == self.layer_count

    def describes_clip(self, encoder_widths: Mapping[str, int]) -> bool:
        """A CLIP of this family: exactly its text encoders, at their widths (``{"clip_l": 768}``)."""
        return dict(encoder_widths) == {e.name: e.width for e in self.text_encoders}

    def describe_unet(self) -> str:
        """How messages describe the family's UNet."""
        return f"{self.label}-type ({self.layer_count} cross-attention layers, {self.context_dim}-wide)"
