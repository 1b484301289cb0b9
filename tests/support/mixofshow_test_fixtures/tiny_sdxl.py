"""Tiny SDXL-architecture models built in-process from ComfyUI's own classes (the test twin of tiny_sd15).

  UNet  : comfy.model_base.SDXL (EPS, SDXL latent format) via comfy.supported_models.SDXL(<small unet_config>)
          "narrow": SDXL's block layout (channel_mult 1,2,4, 2 res blocks, transformer depths 2/10 at input blocks
                    4,5 / 7,8, 10 in the middle, 10/2 at output blocks 0-2 / 3-5: 70 cross-attention layers),
                    linear proj_in/out, context 2048, adm 2816, with model_channels=64 and 64-wide heads (2 and 4
                    heads) -> the state-dict KEY NAMES are SDXL's (only widths differ)
          the families the pack refuses, at the same small width: "refiner" (SDXL refiner: context 1280, adm
          2560, 4-block transformers in 4 levels), "ssd1b" (SSD-1B's fewer blocks), "sd2" (SD2.x: context 1024)
  CLIP  : comfy.sd.CLIP with ComfyUI's SDXLTokenizer (bundled tokenizer, offline) and its SDXLClipModel with both
          encoders at full width (CLIP-L 768, OpenCLIP-bigG 1280: the real 2048-wide context and 1280-wide
          pooled vector) but 3 layers (ComfyUI reads the penultimate layer, so 3 is the fewest that keep a layer
          after it) and a 128-wide MLP; "refiner": bigG only; "sd2": one 1024-wide encoder (clip_h)
  VAE   : tiny_sd15's (SDXL's VAE has SD1.5's architecture).
All weights random (seeded). Returns (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) like CheckpointLoaderSimple.
"""
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import torch

from .tiny_sd15 import _randomize_, build_vae

_COMMON = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
           'legacy': False, 'num_classes': 'sequential', 'in_channels': 4, 'model_channels': 64,
           'use_linear_in_transformer': True, 'num_head_channels': 64, 'use_temporal_attention': False,
           'use_temporal_resblock': False}
UNET_CONFIGS = {
    "narrow": {**_COMMON, 'adm_in_channels': 2816, 'num_res_blocks': [2, 2, 2], 'channel_mult': [1, 2, 4],
               'transformer_depth': [0, 0, 2, 2, 10, 10], 'transformer_depth_middle': 10,
               'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10], 'context_dim': 2048},
    "refiner": {**_COMMON, 'adm_in_channels': 2560, 'num_res_blocks': [2, 2, 2, 2], 'channel_mult': [1, 2, 4, 4],
                'transformer_depth': [0, 0, 4, 4, 4, 4, 0, 0], 'transformer_depth_middle': 4,
                'transformer_depth_output': [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0], 'context_dim': 1280},
    "ssd1b": {**_COMMON, 'adm_in_channels': 2816, 'num_res_blocks': [2, 2, 2], 'channel_mult': [1, 2, 4],
              'transformer_depth': [0, 0, 2, 2, 4, 4], 'transformer_depth_middle': -1,
              'transformer_depth_output': [0, 0, 0, 1, 1, 2, 10, 4, 4], 'context_dim': 2048},
    "sd2": {**_COMMON, 'num_classes': None, 'adm_in_channels': None, 'num_res_blocks': [2, 2, 2, 2],
            'channel_mult': [1, 2, 4, 4], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'transformer_depth_middle': 1,
            'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 'context_dim': 1024},
}
_SUPPORTED = {"narrow": comfy.supported_models.SDXL, "refiner": comfy.supported_models.SDXLRefiner,
              "ssd1b": comfy.supported_models.SSD1B, "sd2": comfy.supported_models.SD20}
# overrides of ComfyUI's own CLIP-L / bigG configs (full width, few layers)
TINY_TEXT = {"num_hidden_layers": 3, "intermediate_size": 128}
TINY_CLIP_OPTIONS = {"clip_l_model_config": TINY_TEXT, "clip_g_model_config": TINY_TEXT}


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None):
        super().__init__(device=device, dtype=dtype, model_options={**(model_options or {}), **TINY_CLIP_OPTIONS})


class TinyRefinerClipModel(comfy.sdxl_clip.SDXLRefinerClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None):
        super().__init__(device=device, dtype=dtype, model_options={**(model_options or {}), **TINY_CLIP_OPTIONS})


class _TinyClipH(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        config = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
                  "hidden_size": 1024, "intermediate_size": 128, "layer_norm_eps": 1e-05,
                  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 16,
                  "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": 1024, "vocab_size": 49408}
        super().__init__(device=device, dtype=dtype, model_options=model_options or {}, textmodel_json_config=config,
                         layer="hidden", layer_idx=-2, special_tokens={"start": 49406, "end": 49407, "pad": 0})


class TinySD2ClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options or {}, clip_name="h",
                         clip_model=_TinyClipH, **kwargs)


class _SD2Tokenizer(comfy.sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data=None):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {}, clip_name="h")


_CLIPS = {"narrow": (comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel), "ssd1b": (comfy.sdxl_clip.SDXLTokenizer,
                                                                                    TinySDXLClipModel),
          "refiner": (comfy.sdxl_clip.SDXLTokenizer, TinyRefinerClipModel), "sd2": (_SD2Tokenizer, TinySD2ClipModel)}


def build_model(kind="narrow", seed=0, dtype=torch.float32):
    cfg = dict(UNET_CONFIGS[kind])
    cfg["dtype"] = dtype
    mc = _SUPPORTED[kind](cfg)
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "")              # comfy.model_base.SDXL (SDXLRefiner, BaseModel), ModelType.EPS
    _randomize_(model.diffusion_model, seed)
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def build_clip(kind="narrow", seed=1, embedding_directory=None):
    tokenizer, clip_model = _CLIPS[kind]
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, clip_model),
                         embedding_directory=embedding_directory)
    _randomize_(clip.cond_stage_model, seed)
    return clip


def build_all(kind="narrow", seed=0):
    return build_model(kind, seed), build_clip(kind, seed + 1), build_vae(seed + 2)


def controlnet_state_dict(seed=5):
    """A random ControlNet (OpenPose-ControlNet layout: 3-channel hint, ldm keys under control_model.) matching
    the tiny SDXL UNet, for the stock ControlNetLoader."""
    import comfy.cldm.cldm
    import comfy.ops

    cfg = dict(UNET_CONFIGS["narrow"])
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    net = comfy.cldm.cldm.ControlNet(**cfg)
    _randomize_(net, seed)
    return {"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}
