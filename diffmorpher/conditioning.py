"""Prompt conditioning: what differs between model families, behind one small interface.

A UNet call needs, besides the latents and the timestep, the prompt's conditioning. For SD 1.x/2.x
that is the CLIP text encoder's last hidden state (`encoder_hidden_states`); SDXL adds, per
sample, the pooled embedding of its second encoder and six "time ids" (original size, crop, target
size) in `added_cond_kwargs` (diffusers' `StableDiffusionXLPipeline.encode_prompt` and
`_get_add_time_ids`). Every stage of the morph (LoRA fitting, inversion, endpoints, frames, the
reschedule's measuring pass) calls the UNet with `**conditioning.unet_kwargs()`, and the frames'
text interpolation (paper Sec. 3.2: (1 - alpha) E(P0) + alpha E(P1)) is `mix`/`lerp`, which
interpolate every conditioning tensor alike (pooled embeddings as the sequence embeddings; time
ids are equal at both ends of a morph at one resolution). A new family is a new `TextConditioner`,
chosen when the models load (models.py); no stage asks which family it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .transfer import row_index


@dataclass(frozen=True)
class PromptConditioning:
    """The UNet conditioning of a batch of prompts, one row per prompt.

    `encoder_hidden_states` is (B, L, D); `added_cond_kwargs` holds the family's extra (B, ...)
    tensors (SDXL: `text_embeds`, `time_ids`), None where the UNet takes none.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.encoder_hidden_states)

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `unet(latents, timestep, **kwargs)`."""
        if self.added_cond_kwargs is None:
            return {"encoder_hidden_states": self.encoder_hidden_states}
        return {"encoder_hidden_states": self.encoder_hidden_states, "added_cond_kwargs": self.added_cond_kwargs}

    def select(self, rows: Sequence[int]) -> PromptConditioning:
        """The conditioning of the prompts `rows`, in that order (a batch's endpoint images)."""
        index = row_index(rows)  # a slice where the rows are consecutive: no index copied to the device
        return self._map(lambda tensor: tensor[index])

    def mix(self, weights: torch.Tensor) -> PromptConditioning:
        """(B, K) weights over these K prompts -> B rows, row b = sum_k w_bk c_k: the text
        conditioning of B frames, each at its own point between the K images (paper Sec. 3.2)."""
        return self._map(lambda tensor: torch.einsum("bk,k...->b...", weights.to(tensor), tensor))

    def lerp(self, other: PromptConditioning, alphas: torch.Tensor) -> PromptConditioning:
        """(1 - a) * self + a * other for each of the (B,) alphas; self and other are one row
        each. The paper's text-embedding interpolation between two prompts."""
        weights = torch.stack([1 - alphas, alphas], dim=1)
        return cat([self, other]).mix(weights)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptConditioning:
        added = None if self.added_cond_kwargs is None else {k: fn(v) for k, v in self.added_cond_kwargs.items()}
        return PromptConditioning(fn(self.encoder_hidden_states), added)


def cat(parts: Sequence[PromptConditioning]) -> PromptConditioning:
    """The rows of `parts` one after another (a batch of endpoint rows and frame rows)."""
    first = parts[0]
    added = None
    if first.added_cond_kwargs is not None:
        added = {key: torch.cat([part.added_cond_kwargs[key] for part in parts])  # type: ignore[index]
                 for key in first.added_cond_kwargs}
    return PromptConditioning(torch.cat([part.encoder_hidden_states for part in parts]), added)


class TextConditioner(Protocol):
    """Turns prompts into UNet conditioning for one model family."""

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        """The frozen text encoders, in a fixed order (what the model identity hashes)."""
        ...

    def encode(self, prompts: Sequence[str], resolution: int) -> PromptConditioning:
        """One row per prompt, in the run dtype on the run device. `resolution` is the square
        side the morph runs at (SDXL's time ids name it; SD 1.x/2.x ignores it)."""
        ...


class StableDiffusionConditioner:
    """SD 1.x/2.x: one CLIP text encoder; the UNet cross-attends to its last hidden state over
    the tokenizer's padded 77 tokens (as diffusers' StableDiffusionPipeline.encode_prompt, with
    no guidance, so no negative prompt)."""

    def __init__(
        self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,)

    def encode(self, prompts: Sequence[str], resolution: int) -> PromptConditioning:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return PromptConditioning(self.text_encoder(tokens)[0].to(self.dtype))


class StableDiffusionXLConditioner:
    """SDXL base: two CLIP text encoders (ViT-L, then OpenCLIP bigG with a projection). As in
    diffusers' StableDiffusionXLPipeline.encode_prompt (no guidance): the UNet cross-attends to the
    concatenation of both encoders' penultimate hidden states; `added_cond_kwargs` holds the
    projected pooled embedding of the second encoder (`text_embeds`) and, as `_get_add_time_ids`
    builds them, the six time ids original size (H, W), crop top-left (0, 0), target size (H, W)
    at the morph's square resolution."""

    def __init__(
        self,
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
        text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.dtype = dtype

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(self.text_encoders)

    def encode(self, prompts: Sequence[str], resolution: int) -> PromptConditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            tokens = tokenizer(
                list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            output = encoder(tokens, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's (with projection) text_embeds
        assert pooled is not None
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=self.device)
        return PromptConditioning(
            torch.cat(hidden, dim=-1).to(self.dtype),
            {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype).repeat(len(prompts), 1)},
        )
