"""Where each diffusers tensor lives in an original ("LDM", CompVis/Stability) single-file checkpoint.

One table per component, written from diffusers' key names: `placements()` says, for every key
of a diffusers component's state dict, the original key that holds it and how its layout differs.
The same table serves both directions, so a file written here reads back exactly:

- `to_original` (diffusers -> original, the writer): fuses OpenCLIP's q/k/v, adds the VAE
  attention's 1x1 conv dimensions, transposes the text projection.
- `from_original` (original -> diffusers, the export's reader): the inverse.

The original names (facts of the published checkpoints' layout):
- UNet under `model.diffusion_model.`: `input_blocks.N` (conv_in, then per down block its
  resnet+transformer layers and a downsampler `op`), `middle_block.0/1/2`, `output_blocks.N`
  (per up block layers_per_block+1 layers, the last one ending in an upsampler `conv`),
  `time_embed.0/2`, `label_emb.0.0/2` (SDXL's added conditioning), `out.0/2`. Resnets use
  `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection`; transformer blocks keep
  diffusers' own names.
- VAE under `first_stage_model.`: `encoder.down.N.block.M`, `decoder.up.N` numbered from the
  lowest resolution (diffusers' up_blocks reversed), `mid.block_1/attn_1/block_2`, resnet
  shortcut `nin_shortcut`, attention `norm`, `q`, `k`, `v`, `proj_out` as 1x1 convolutions.
- Text encoders: CLIP ViT-L (SD 1.x, SDXL's first) is the transformers model under a prefix;
  OpenCLIP (SD 2.x, SDXL's second) is `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}`, `token_embedding`, `positional_embedding`, `ln_final`,
  `text_projection` (a [hidden, projection] matrix, the transpose of transformers' Linear).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Text encoder layouts and where each sits in the file.
CLIP, OPENCLIP = "clip", "openclip"
SD_TEXT_PREFIXES = {CLIP: "cond_stage_model.transformer.", OPENCLIP: "cond_stage_model.model."}
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

Kind = Literal["same", "conv1x1", "transpose", "qkv"]


class KeyMapError(CheckpointError):
    """A diffusers key with no place in the original layout (an unsupported component option)."""


@dataclass(frozen=True)
class Placement:
    """The original key holding one diffusers tensor, and how the two layouts differ."""

    key: str
    kind: Kind = "same"  # conv1x1: [C, C] <-> [C, C, 1, 1]; transpose: [a, b] <-> [b, a]
    part: int = 0  # qkv: which third of the fused in_proj (0 q, 1 k, 2 v)


# --------------------------------------------------------------------------------------- UNet
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# SDXL's added conditioning (pooled text + time ids): one MLP in both layouts.
_UNET_TEXT_TIME = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: list[str], names: Mapping[str, str]) -> str:
    module, tail = rest[0], rest[1:]
    if module not in names:
        raise KeyMapError(f"resnet part {module!r}")
    return ".".join([names[module], *tail])


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise KeyMapError(f"layers_per_block={layers!r} (one number per block has no original layout)")
    return layers


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The original name of a UNet2DConditionModel key (without the prefix)."""
    layers = _layers_per_block(config)
    parts = key.split(".")
    for table in (_UNET_TOP, _UNET_TEXT_TIME):
        for name, original in table.items():
            if key.startswith(name + "."):
                return original + key[len(name):]
    if parts[0] == "add_embedding" and config.get("addition_embed_type") == "text":
        # diffusers' TextTimeEmbedding (the embedded model's) has no original counterpart: it keeps
        # its diffusers name, which no original key uses.
        return key
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = 1 + block * (layers + 1)
        if kind == "resnets":
            return f"input_blocks.{first + index}.0.{_resnet(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{first + index}.1.{'.'.join(rest)}"
        if kind == "downsamplers":  # downsamplers.0.conv.weight -> op.weight
            return f"input_blocks.{first + layers}.0.op.{'.'.join(rest[1:])}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet(rest, _UNET_RESNET)}"
        if kind == "attentions" and index == 0:
            return f"middle_block.1.{'.'.join(rest)}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = block * (layers + 1)
        if kind == "resnets":
            return f"output_blocks.{first + index}.0.{_resnet(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{first + index}.1.{'.'.join(rest)}"
        if kind == "upsamplers":  # after the resnet, and after the transformer where there is one
            position = 2 if "CrossAttn" in config["up_block_types"][block] else 1
            return f"output_blocks.{first + layers}.{position}.conv.{'.'.join(rest[1:])}"
    raise KeyMapError(f"UNet key {key!r}")


# ---------------------------------------------------------------------------------------- VAE
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}


def vae_placement(key: str, config: Mapping[str, Any]) -> Placement:
    """The original place of an AutoencoderKL key (without the prefix)."""
    parts = key.split(".")
    top = parts[0] if parts[0] in _VAE_TOP else None
    if top:
        return Placement(key)
    side, rest = parts[0], parts[1:]  # encoder / decoder
    if rest[0] in ("conv_in", "conv_out"):
        return Placement(key)
    if rest[0] == "conv_norm_out":
        return Placement(".".join([side, "norm_out", *rest[1:]]))
    if rest[0] == "mid_block":
        kind, index, tail = rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return Placement(f"{side}.mid.block_{index + 1}.{_resnet(tail, _VAE_RESNET)}")
        if kind == "attentions" and index == 0:
            module = ".".join(tail[:-1])
            if module not in _VAE_ATTENTION:
                raise KeyMapError(f"VAE attention part {key!r}")
            original = f"{side}.mid.attn_1.{_VAE_ATTENTION[module]}.{tail[-1]}"
            # The original attention is four 1x1 convolutions: 4-D weights where diffusers has linears.
            return Placement(original, "conv1x1" if module != "group_norm" and tail[-1] == "weight" else "same")
    if side == "encoder" and rest[0] == "down_blocks":
        block, kind, index, tail = int(rest[1]), rest[2], int(rest[3]), rest[4:]
        if kind == "resnets":
            return Placement(f"encoder.down.{block}.block.{index}.{_resnet(tail, _VAE_RESNET)}")
        if kind == "downsamplers":
            return Placement(f"encoder.down.{block}.downsample.{'.'.join(tail)}")
    if side == "decoder" and rest[0] == "up_blocks":
        level = len(config["block_out_channels"]) - 1 - int(rest[1])  # numbered from the bottom
        kind, index, tail = rest[2], int(rest[3]), rest[4:]
        if kind == "resnets":
            return Placement(f"decoder.up.{level}.block.{index}.{_resnet(tail, _VAE_RESNET)}")
        if kind == "upsamplers":
            return Placement(f"decoder.up.{level}.upsample.{'.'.join(tail)}")
    raise KeyMapError(f"VAE key {key!r}")


# ------------------------------------------------------------------------------ text encoders
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": Placement("token_embedding.weight"),
                 "text_model.embeddings.position_embedding.weight": Placement("positional_embedding"),
                 "text_model.final_layer_norm.weight": Placement("ln_final.weight"),
                 "text_model.final_layer_norm.bias": Placement("ln_final.bias"),
                 "text_projection.weight": Placement("text_projection", "transpose")}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def openclip_placement(key: str) -> Placement:
    """The OpenCLIP place of a transformers CLIPTextModel(WithProjection) key."""
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key]
    prefix = "text_model.encoder.layers."
    if key.startswith(prefix):
        index, _, rest = key[len(prefix):].partition(".")
        module, _, tensor = rest.rpartition(".")
        layer = f"transformer.resblocks.{index}"
        if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
            return Placement(f"{layer}.attn.in_proj_{tensor}", "qkv", _QKV[module[len("self_attn."):]])
        if module in _OPENCLIP_LAYER:
            return Placement(f"{layer}.{_OPENCLIP_LAYER[module]}.{tensor}")
    raise KeyMapError(f"text encoder key {key!r} (OpenCLIP layout)")


def text_placement(key: str, layout: str) -> Placement:
    if layout == CLIP:
        return Placement(key)  # the transformers model itself, under a prefix
    if layout == OPENCLIP:
        return openclip_placement(key)
    raise KeyMapError(f"text encoder layout {layout!r} (supported: {CLIP}, {OPENCLIP})")


# ------------------------------------------------------------------------------- both directions
def placements(component: str, keys: Iterable[str], *, prefix: str, config: Mapping[str, Any] | None = None,
               layout: str = CLIP) -> dict[str, Placement]:
    """diffusers key -> its original Placement (prefixed), for a "unet", "vae" or "text" component."""
    result = {}
    for key in keys:
        if component == "unet":
            placement = Placement(unet_key(key, config or {}))
        elif component == "vae":
            placement = vae_placement(key, config or {})
        elif component == "text":
            placement = text_placement(key, layout)
        else:
            raise KeyMapError(f"component {component!r}")
        result[key] = Placement(prefix + placement.key, placement.kind, placement.part)
    return result


def to_original(state: Mapping[str, torch.Tensor], where: Mapping[str, Placement]) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the original layout (works on meta tensors: shapes only)."""
    original: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in state.items():
        placement = where[key]
        if placement.kind == "qkv":
            fused.setdefault(placement.key, [None, None, None])[placement.part] = tensor
        elif placement.kind == "conv1x1":
            original[placement.key] = tensor[:, :, None, None].contiguous()
        elif placement.kind == "transpose":
            original[placement.key] = tensor.T.contiguous()
        else:
            original[placement.key] = tensor
    for key, thirds in fused.items():
        if any(third is None for third in thirds):
            raise KeyMapError(f"{key}: q, k and v are all needed to fuse in_proj")
        original[key] = torch.cat(thirds, dim=0)  # type: ignore[arg-type]
    return original


def from_original(get: Callable[[str], torch.Tensor], where: Mapping[str, Placement]) -> dict[str, torch.Tensor]:
    """The diffusers state dict, reading each original tensor once through `get`."""
    state: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    for key, placement in where.items():
        if placement.kind == "qkv":
            if placement.key not in cache:
                cache[placement.key] = get(placement.key)
            state[key] = cache[placement.key].chunk(3, dim=0)[placement.part].clone()
        elif placement.kind == "conv1x1":  # some re-saved files already hold the 2-D linear weight
            tensor = get(placement.key)
            state[key] = tensor[:, :, 0, 0].clone() if tensor.ndim == 4 else tensor
        elif placement.kind == "transpose":
            state[key] = get(placement.key).T.contiguous()
        else:
            state[key] = get(placement.key)
    return state
