"""Opt-in `torch.compile` of the UNet's static blocks.

The morph swaps every attention processor per call and drives them from Python state (the
controller's mode, step and store), which dynamo would guard on and recompile for at every step.
The ResNet blocks and the transformer feed-forwards hold most of the UNet's arithmetic and do
not change between calls, so those are what is compiled (each module in place, its graph reused
by every morph of the same shapes); the attention processors stay eager. Worth it on a GPU
(fused GroupNorm/SiLU/GEGLU kernels, fewer launches); the first morph pays the compilation.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D

COMPILE_OFF = "off"
COMPILED_BLOCKS: tuple[type[torch.nn.Module], ...] = (ResnetBlock2D, FeedForward)


def compile_unet_blocks(unet: torch.nn.Module, backend: str = "inductor", dynamic: bool | None = None) -> int:
    """Compile every ResNet block and feed-forward of `unet` in place with `backend` (a
    torch.compile backend name; "off" does nothing). Returns how many modules were compiled."""
    if backend == COMPILE_OFF:
        return 0
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"unknown torch.compile backend {backend!r}; known: {torch._dynamo.list_backends()}")
    compiled = 0
    for module in unet.modules():
        if isinstance(module, COMPILED_BLOCKS):
            module.compile(backend=backend, dynamic=dynamic)
            compiled += 1
    return compiled
