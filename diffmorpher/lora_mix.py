"""Per-sample LoRA interpolation inside a batch, without building weights per frame.

The paper loads, for frame alpha, a LoRA whose down and up matrices are both lerped:
A(a) = (1-a) A0 + a A1 and B(a) = (1-a) B0 + a B1. Its output on x is B(a) A(a) x, which
expands into quantities shared by the whole batch:

    u     = (1-a) * (A0 x) + a * (A1 x)            # rank-r activations, per sample
    delta = (1-a) * (B0 u) + a * (B1 u)

so each sample of a batch can carry its own alpha (or, with K images, its own weights over the K
LoRAs) and the base weights are never copied. With weights (1, 0) the result is exactly LoRA_0's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .transfer import move_together


class OwnLora:
    """LoRA weights meaning "row b of the batch uses LoRA b of the stack" (batched fitting: K
    images, K LoRAs): the rows need no mix, and fitting skips two weight einsums per layer call
    and their backward (a fifth of a fitting step on the embedded model)."""

    def __repr__(self) -> str:
        return "OWN_LORA"


OWN_LORA = OwnLora()


class SharedLora:
    """LoRA weights meaning "every row of the batch uses the stack's one LoRA" (shared_lora: one
    LoRA fitted on all the images, for every frame): the LoRA is applied as it is, two small
    matmuls per projection, with no per-row mix (the paper's mix of two copies of the same LoRA
    would give the same values at the cost of two einsums per layer call)."""

    def __repr__(self) -> str:
        return "SHARED_LORA"


SHARED_LORA = SharedLora()
LoraWeights = torch.Tensor | OwnLora | SharedLora | None


@dataclass
class LoraStack:
    """The K LoRAs of one linear layer: down (K, r, in) and up (K, out, r) matrices."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float = 1.0


def build_lora_stacks(
    loras: list[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> dict[str, LoraStack]:
    """Group K peft state dicts (keys `<module>.lora_A.weight` / `<module>.lora_B.weight`, as
    returned by `get_peft_model_state_dict`) by target module path, e.g.
    `up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.

    LoRAs are fitted with lora_alpha == rank, so their scaling is 1.
    """
    reference = set(loras[0])
    for index, lora in enumerate(loras[1:], start=1):
        if set(lora) != reference:
            raise ConfigError(f"LoRA {index} does not have the same parameters as LoRA 0")
    modules: list[str] = []
    for key in sorted(reference):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up_key = f"{module}.lora_B.weight"
        if up_key not in reference:
            raise ConfigError(f"LoRA has {key} but no {up_key}")
        modules.append(module)
    if not modules:
        raise ConfigError("LoRA state dict has no lora_A/lora_B weights")
    host = [torch.stack([lora[f"{module}.{part}.weight"] for lora in loras]).to(dtype)
            for module in modules for part in ("lora_A", "lora_B")]
    moved = move_together(host, device)  # one copy for the whole stack, not two per module
    return {module: LoraStack(down=moved[2 * i], up=moved[2 * i + 1]) for i, module in enumerate(modules)}


def mixed_linear(
    linear: nn.Module, x: torch.Tensor, stack: LoraStack | None, weights: LoraWeights
) -> torch.Tensor:
    """linear(x) plus the LoRA of each sample's own parameter mix: with A_b = sum_k w_bk A_k and
    B_b = sum_k w_bk B_k (the paper interpolates the LoRA parameters), x_b -> B_b A_b x_b.
    x is (B, L, in), weights (B, K) on x's device (the caller moves them once per batch,
    batching.Batch.on: a move here would copy them to the device for every projection of every
    UNet call), OWN_LORA (A_b = A_b: one LoRA per row) or SHARED_LORA (the stack's one LoRA
    for every row). The mixed factors are (B, r, in) and
    (B, out, r), small next to the layer; nothing is read back to the host (no per-LoRA zero
    test)."""
    out = linear(x)
    if stack is None or weights is None:
        return out
    down, up = stack.down.to(x.dtype), stack.up.to(x.dtype)  # no-op unless fitting in fp32
    if isinstance(weights, SharedLora):  # the stack holds one LoRA, the same for every row
        return out + stack.scaling * F.linear(F.linear(x, down[0]), up[0])
    if not isinstance(weights, OwnLora):
        w = weights.to(x.dtype)  # no-op: the batch's weights are in the run dtype
        down = torch.einsum("bk,kri->bri", w, down)
        up = torch.einsum("bk,kor->bor", w, up)
    hidden = torch.bmm(x, down.transpose(1, 2))
    return out + stack.scaling * torch.bmm(hidden, up.transpose(1, 2))
