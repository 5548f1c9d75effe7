"""Batch planning: which rows share a UNet call, and each row's weights over the K images.

A morph of K images has K-1 segments; a point of segment k at alpha is the mix (1 - alpha) of
image k and alpha of image k+1, written as weights over the K images. Those weights drive every
per-sample interpolation of a batch (attention mix, text conditioning, LoRA mix), so frames of
different segments and alphas share one UNet call. The K endpoint rows come first in a pass and
ride in its first batch: their attention store at a layer and step is written before the frames
of the same call read it (attention.MorphController), so they cost no pass of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence, TypeVar

import torch

from .attention import MODE_OFF, MODE_REPLACE, MODE_STORE, MorphController
from .conditioning import PromptConditioning, cat
from .config import AUTO_FRAME_BATCH, DEFAULT_FRAME_BATCH, MorphConfig
from .devices import free_memory_bytes
from .interpolation import interpolate_latents
from .lora_mix import SHARED_LORA, SharedLora
from .transfer import row_index

T = TypeVar("T")


@dataclass(frozen=True)
class FrameSpec:
    """One frame to denoise: segment k (between images k and k+1) at alpha."""

    segment: int
    alpha: float
    index: int  # position in the final, concatenated sequence

    @property
    def is_intermediate(self) -> bool:
        """Strictly between the endpoints: denoised as a frame (an endpoint is reconstructed)."""
        return 0.0 < self.alpha < 1.0

    @property
    def endpoint(self) -> int:
        """The image an endpoint frame reproduces (alpha 0: image k, alpha 1: image k+1)."""
        return self.segment + (1 if self.alpha >= 1.0 else 0)


@dataclass(frozen=True)
class Batch:
    """The rows of one UNet call: endpoint images first, then frames.

    `weights` (len(frames), K) places each frame between the K images (attention and text mix);
    `lora_weights` (rows, K) is each row's LoRA mix, SHARED_LORA where every row uses the one
    shared LoRA (shared_lora), None without LoRAs. `mode` is what the
    up-block self-attention does: off (inversion), store (endpoints only) or replace.
    """

    mode: str
    images: list[int]
    frames: list[FrameSpec]
    weights: torch.Tensor
    lora_weights: torch.Tensor | SharedLora | None
    alphas: torch.Tensor | None = None  # (len(frames),) float32: each frame's alpha (slerp, AdaIN)

    def on(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """The batch with its per-row tensors on the device, moved once before its UNet calls:
        the mix weights in the run dtype (the attention, text and LoRA mixes use them in it) and
        the alphas in float32 (slerp widens them). Built on the host, they would otherwise be
        copied to the device by every layer that reads them, at every step."""
        lora = self.lora_weights
        if isinstance(lora, torch.Tensor):
            lora = lora.to(device=device, dtype=dtype)
        alphas = None if self.alphas is None else self.alphas.to(device)
        return replace(self, weights=self.weights.to(device=device, dtype=dtype), lora_weights=lora, alphas=alphas)

    @property
    def rows(self) -> int:
        return len(self.images) + len(self.frames)

    def split(self, size: int) -> list["Batch"]:
        """The same rows in consecutive batches of at most `size` (endpoints still first), for a
        batch that ran out of memory. Each row's result depends on its own weights alone, and a
        part's frames follow every endpoint row, so the parts compute what the batch would."""
        return [self._rows(start, min(start + size, self.rows)) for start in range(0, self.rows, size)]

    def _rows(self, start: int, stop: int) -> "Batch":
        count = len(self.images)
        images, first, last = self.images[start:stop], max(0, start - count), max(0, stop - count)
        frames = self.frames[first:last]
        mode = self.mode if self.mode == MODE_OFF else MODE_REPLACE if frames else MODE_STORE
        lora_weights = self.lora_weights
        if isinstance(lora_weights, torch.Tensor):
            lora_weights = lora_weights[start:stop]
        alphas = None if self.alphas is None else self.alphas[first:last]
        return Batch(mode, images, frames, self.weights[first:last], lora_weights, alphas)

    def apply(self, controller: MorphController) -> None:
        """Tell the attention processors what this batch's rows are, before its UNet calls."""
        controller.mode = self.mode
        controller.weights = self.weights
        controller.lora_weights = self.lora_weights
        controller.image_indices = self.images or None

    def conditioning(self, prompts: PromptConditioning) -> PromptConditioning:
        """The rows' prompt conditioning: the endpoints' own, then each frame's mix."""
        return cat([prompts.select(self.images), prompts.mix(self.weights)])

    def start_latents(self, noise: torch.Tensor, use_adain: bool) -> torch.Tensor:
        """z_T of the rows: an endpoint's inverted latent; a frame's slerp (+ AdaIN) of its
        segment's two (paper Sec. 3.2), all frames in one call with their alphas (`on` moved
        them to the device). Rows are picked by slices: no index goes to the device."""
        parts = [noise[row_index(self.images)]]
        if self.frames:
            assert self.alphas is not None
            z0 = torch.cat([noise[s.segment : s.segment + 1] for s in self.frames])
            z1 = torch.cat([noise[s.segment + 1 : s.segment + 2] for s in self.frames])
            parts.append(interpolate_latents(z0, z1, self.alphas, use_adain))
        return torch.cat(parts)


def frame_specs(per_segment: Sequence[Sequence[float]]) -> list[FrameSpec]:
    """Frame specs of the concatenated sequence; joints appear once (as alpha 1 of a segment
    they are skipped, being alpha 0 of the next)."""
    specs: list[FrameSpec] = []
    for segment, alphas in enumerate(per_segment):
        last = segment == len(per_segment) - 1
        for alpha in alphas if last else alphas[:-1]:
            specs.append(FrameSpec(segment, float(alpha), len(specs)))
    return specs


# The UNet's peak live activations per sample over its first feature map (block_out_channels[0]
# x latent^2 values): a conservative round figure (the down path's skip connections alive across
# the call, ~12 maps, x a few for the attention blocks' intermediates; docs/sizing.md).
ACTIVATION_FACTOR = 40
# Device memory a frame batch leaves alone: allocator slack and fragmentation, LPIPS, the
# attention store, the latents of the pass (docs/sizing.md "Frame batch on a GPU").
RESERVE_BYTES = 1 << 30


def activation_bytes(unet_channels: int, latent_side: int, bytes_per_value: int) -> int:
    """Estimated peak UNet inference activations of one sample (SDPA attention: no score
    matrix): ACTIVATION_FACTOR x its first feature map."""
    return ACTIVATION_FACTOR * unet_channels * latent_side * latent_side * bytes_per_value


def decode_bytes(vae_channels: int, resolution: int, bytes_per_value: int) -> int:
    """Estimated peak activations of one image's VAE decode: 3 x the decoder's widest
    full-resolution feature map."""
    return 3 * vae_channels * resolution * resolution * bytes_per_value


def frame_batch_size(config: MorphConfig, device: torch.device, per_sample: int, reserve: int) -> int:
    """Rows per UNet call: the configured number; for AUTO_FRAME_BATCH the largest power of two
    whose estimated activations (`per_sample` bytes each) fit the device's free memory less
    `reserve` bytes, between 1 and DEFAULT_FRAME_BATCH; DEFAULT_FRAME_BATCH where the device
    reports no free memory (CPU, MPS)."""
    if config.frame_batch_size != AUTO_FRAME_BATCH:
        return config.frame_batch_size
    free = free_memory_bytes(device)
    if free is None:
        return DEFAULT_FRAME_BATCH
    fits = max(1, (free - reserve) // max(1, per_sample))
    return min(1 << (fits.bit_length() - 1), DEFAULT_FRAME_BATCH)


def rows_per_call(config: MorphConfig) -> int:
    """config.frame_batch_size, or DEFAULT_FRAME_BATCH where it was left to the pipeline's choice
    (AUTO_FRAME_BATCH) and the caller made none."""
    return config.frame_batch_size or DEFAULT_FRAME_BATCH


def inversion_batches(indices: list[int], num_images: int, config: MorphConfig) -> list[Batch]:
    """The images to invert, `frame_batch_size` per UNet call, each with its endpoint LoRA mix."""
    return [
        Batch(MODE_OFF, chunk, [], torch.zeros(0, num_images), endpoint_lora_weights(chunk, num_images, config))
        for chunk in chunks(indices, rows_per_call(config))
    ]


def sequence_batches(specs: list[FrameSpec], num_images: int, config: MorphConfig) -> list[Batch]:
    """A pass's rows (the K endpoints, then the intermediate frames) cut into batches of
    `frame_batch_size`; a batch with frames replaces attention, one of endpoints only stores."""
    rows: list[int | FrameSpec] = [*range(num_images), *(s for s in specs if s.is_intermediate)]
    batches = []
    for chunk in chunks(rows, rows_per_call(config)):
        images = [row for row in chunk if isinstance(row, int)]
        frames = [row for row in chunk if isinstance(row, FrameSpec)]
        weights = (torch.stack([segment_weights(s.segment, s.alpha, num_images) for s in frames])
                   if frames else torch.zeros(0, num_images))
        lora_parts = [endpoint_lora_weights(images, num_images, config) if images else None,
                      frame_lora_weights(frames, num_images, config) if frames else None]
        lora_weights: torch.Tensor | SharedLora | None = None
        if config.lora_mode == "shared":
            lora_weights = SHARED_LORA
        elif config.lora_mode != "none":
            lora_weights = torch.cat([w for w in lora_parts if isinstance(w, torch.Tensor)])
        alphas = torch.tensor([s.alpha for s in frames], dtype=torch.float32)
        batches.append(Batch(MODE_REPLACE if frames else MODE_STORE, images, frames, weights, lora_weights, alphas))
    return batches


def endpoint_lora_weights(
    images: list[int], num_images: int, config: MorphConfig
) -> torch.Tensor | SharedLora | None:
    """LoRA mix used to invert and reconstruct image i: its own LoRA, or in fixed mode the
    fixed mix of the segment it starts (the last image: the segment it ends), or the shared one."""
    if config.lora_mode == "none":
        return None
    if config.lora_mode == "shared":
        return SHARED_LORA
    if config.lora_mode == "interpolate":
        return one_hot(images, num_images)
    fixed = float(config.fixed_lora_alpha or 0.0)
    return torch.stack([segment_weights(min(i, num_images - 2), fixed, num_images) for i in images])


def frame_lora_weights(
    specs: list[FrameSpec], num_images: int, config: MorphConfig
) -> torch.Tensor | SharedLora | None:
    """LoRA mix of each frame: its own alpha's (paper Sec. 3.2), the fixed one, or the shared one."""
    if config.lora_mode == "none":
        return None
    if config.lora_mode == "shared":
        return SHARED_LORA
    fixed = config.fixed_lora_alpha
    return torch.stack([segment_weights(s.segment, s.alpha if fixed is None else fixed, num_images) for s in specs])


def one_hot(indices: list[int], num_images: int) -> torch.Tensor:
    """Row i all on image indices[i]."""
    weights = torch.zeros(len(indices), num_images)
    weights[torch.arange(len(indices)), torch.tensor(indices)] = 1.0
    return weights


def segment_weights(segment: int, alpha: float, num_images: int) -> torch.Tensor:
    """Weights over the K images for a point of segment k: (1 - alpha) on k, alpha on k+1."""
    weights = torch.zeros(num_images)
    weights[segment] = 1.0 - alpha
    weights[segment + 1] += alpha
    return weights


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
