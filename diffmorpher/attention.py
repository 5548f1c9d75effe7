"""Self-attention interpolation (paper Sec. 3.3) as diffusers attention processors.

While the K endpoint images are denoised, every self-attention layer of the UNet's up blocks
*stores* its input hidden states for the first lambda * T steps. When an intermediate frame is
denoised, those layers compute keys and values from the mix of the stored inputs (weights of the
frame: (1 - alpha) for image k, alpha for image k+1) instead of from their own input, while the
queries stay their own. This ties every frame to the appearance of both endpoints.

The same processor applies the per-sample LoRA mix (lora_mix.py) to to_q/to_k/to_v/to_out.0, so
inversion, endpoints and frames all run the identical LoRA arithmetic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from .lora_mix import LoraStack, LoraWeights, mixed_linear
from .transfer import row_index

MODE_OFF = "off"
MODE_STORE = "store"
MODE_REPLACE = "replace"


@dataclass
class AttentionStore:
    """Up-block self-attention inputs of the endpoint images: (layer, step) -> (K, L, C).

    Only steps that replacement uses are kept, in the run dtype (about 1.6 GB per endpoint in
    fp32 for SD-2.1 at 512 px with lambda 0.6; a few MB for the embedded model).
    """

    num_images: int
    num_steps: int  # steps that store / replace (the first lambda * T)
    tensors: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def put(self, layer: str, step: int, image_indices: list[int], hidden: torch.Tensor) -> None:
        """Store the rows of `image_indices` (consecutive in a batch: written through a slice,
        so no index is copied to the device per layer and step)."""
        key = (layer, step)
        if key not in self.tensors:
            shape = (self.num_images, *hidden.shape[1:])
            self.tensors[key] = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
        self.tensors[key][row_index(image_indices)] = hidden.detach()

    def mix(self, layer: str, step: int, weights: torch.Tensor) -> torch.Tensor:
        """(B', K) weights -> the (B', L, C) mix of the stored inputs. The pipeline moves the
        weights to the device once per batch (batching.Batch.on); then `.to` here is a no-op."""
        stored = self.tensors[(layer, step)]
        return torch.einsum("bk,klc->blc", weights.to(device=stored.device, dtype=stored.dtype), stored)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class MorphController:
    """State shared by all processors of one morph; the pipeline sets it before each UNet call."""

    store: AttentionStore
    beta: float = 0.0  # weight of the layer's own input in replaced keys/values
    mode: str = MODE_OFF
    step: int = 0
    weights: torch.Tensor | None = None  # (B', K) mix over the K images of each replaced row, on the device
    lora_weights: LoraWeights = None  # (B, K) LoRA mix on the device, OWN_LORA (row b: LoRA b), None: no LoRA
    image_indices: list[int] | None = None  # the batch's leading rows are these images (stored)

    def key_value_input(self, layer: str, hidden: torch.Tensor) -> torch.Tensor:
        """Store mode: every row is an endpoint image; its input is stored. Replace mode: the
        first len(image_indices) rows (if any) are endpoints, stored first, and the remaining
        rows take the mix of the store, so a batch can denoise the endpoints in lockstep with
        the frames that read them (the store at this layer and step is complete before the mix)."""
        if self.step >= self.store.num_steps:
            return hidden
        if self.mode == MODE_STORE:
            assert self.image_indices is not None
            self.store.put(layer, self.step, self.image_indices, hidden)
            return hidden
        if self.mode == MODE_REPLACE:
            assert self.weights is not None
            stored = len(self.image_indices or ())
            if stored:
                self.store.put(layer, self.step, self.image_indices, hidden[:stored])  # type: ignore[arg-type]
            own = hidden[stored:]
            mixed = self.store.mix(layer, self.step, self.weights).to(hidden.dtype)
            if self.beta != 0:
                mixed = (1 - self.beta) * mixed + self.beta * own
            return torch.cat([hidden[:stored], mixed]) if stored else mixed
        return hidden


class MorphAttnProcessor:
    """Scaled-dot-product attention with per-sample LoRA mixing and, for up-block
    self-attention, key/value inputs from the controller. Mirrors diffusers' AttnProcessor2_0."""

    def __init__(
        self,
        layer: str,
        controller: MorphController,
        loras: dict[str, LoraStack],
        interpolate_self_attention: bool,
    ) -> None:
        self.layer = layer
        self.controller = controller
        self.loras = loras  # projection name ("to_q", ...) -> stack, for this layer
        self.interpolate_self_attention = interpolate_self_attention

    def _project(self, name: str, linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(linear, x, self.loras.get(name), self.controller.lora_weights)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._project("to_q", attn.to_q, hidden_states)
        if encoder_hidden_states is None:
            kv_input = hidden_states
            if self.interpolate_self_attention:
                kv_input = self.controller.key_value_input(self.layer, hidden_states)
        elif attn.norm_cross:
            kv_input = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            kv_input = encoder_hidden_states
        key = self._project("to_k", attn.to_k, kv_input)
        value = self._project("to_v", attn.to_v, kv_input)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            scale=attn.scale,
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self._project("to_out.0", attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_interpolated_layer(processor_name: str) -> bool:
    """Self-attention ("attn1") of the up blocks: the layers whose keys/values are interpolated."""
    return processor_name.startswith("up_blocks.") and ".attn1." in processor_name


@contextlib.contextmanager
def morph_attention(
    unet: UNet2DConditionModel,
    controller: MorphController,
    lora_stacks: dict[str, LoraStack] | None,
) -> Iterator[MorphController]:
    """Install MorphAttnProcessors on every attention layer; restore the originals on exit,
    also when the morph fails, so a shared UNet is left as it was found."""
    originals = dict(unet.attn_processors)
    processors = {}
    for name in originals:
        layer = name[: -len(".processor")]
        layer_loras = {
            key[len(layer) + 1 :]: stack
            for key, stack in (lora_stacks or {}).items()
            if key.startswith(layer + ".")
        }
        processors[name] = MorphAttnProcessor(
            layer, controller, layer_loras, interpolate_self_attention=is_interpolated_layer(name)
        )
    unet.set_attn_processor(processors)
    try:
        yield controller
    finally:
        unet.set_attn_processor(originals)
