"""Endpoints a request did not send: one image and K >= 2 prompts.

The authors' issue #27 asks for a morph from one image to what a second prompt describes; their
answer was to make the second image with another tool first. Here the service makes it with the
same model, so the morph's other end keeps the image's layout (position, size, background):

    z_s  = DDIM-invert(E(image), P_0)   over the last s * N of the N sampler steps (no guidance)
    x_k  = DDIM-sample(z_s, P_k)        back over the same steps, classifier-free guidance g:
           eps = eps(z, "") + g * (eps(z, P_k) - eps(z, ""))

s is `endpoint_strength`, g `endpoint_guidance`. The inversion (rather than SDEdit's fresh
noise at level s) keeps what the prompts do not change where the image has it: denoised with P_0
and g = 1 the walk gives the image back (ddim.py), so only the prompt change moves pixels.
The guidance is what makes the change happen within the image's own noise: without it the
inverted latent leads back towards the image. Neither step draws random numbers, so an endpoint
is a function of the image, the prompts, the model and these options alone: the same request
gives the same bytes on every run (and the request's seed, in the cache key with the rest of
the options, does not change it). Measured on the embedded model in docs/core.md.

Endpoint k is made from the uploaded image and P_k (not from endpoint k-1), so K - 1 endpoints
are one batch and an error does not accumulate along the chain.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from .conditioning import PromptConditioning, cat
from .config import MorphConfig
from .ddim import NoiseSchedule, Predictor, ddim_invert, ddim_sample
from .interrupt import StopCheck, never_stop, raise_if_stopped
from .results import STAGE_ENDPOINTS

# The prompt whose conditioning is the unconditional branch of classifier-free guidance (the
# embedded model was trained with 10 % empty captions, SD with 10 % too).
UNCONDITIONAL_PROMPT = ""


def guided_predictor(
    unet: UNet2DConditionModel,
    conditioning: PromptConditioning,
    unconditional: PromptConditioning,
    guidance: float,
    stop: StopCheck = never_stop,
) -> Predictor:
    """The UNet call of one guided step for B rows: `conditioning` has B rows, `unconditional`
    one. With guidance 1 the unconditional branch is skipped (it would cancel out)."""
    rows = len(conditioning)
    if guidance == 1.0:
        kwargs = conditioning.unet_kwargs()
    else:
        kwargs = cat([unconditional.select([0] * rows), conditioning]).unet_kwargs()

    def predict(latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        raise_if_stopped(stop, STAGE_ENDPOINTS)
        if guidance == 1.0:
            return unet(latents, timestep, **kwargs).sample
        both = unet(torch.cat([latents, latents]), timestep, **kwargs).sample
        plain, conditioned = both.chunk(2)
        return plain + guidance * (conditioned - plain)

    return predict


def generate_endpoint_latents(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    latent: torch.Tensor,
    source: PromptConditioning,
    targets: PromptConditioning,
    unconditional: PromptConditioning,
    config: MorphConfig,
    stop: StopCheck = never_stop,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(1, C, h, w) clean latent of the image and its prompt's conditioning (`source`, one
    row) -> (K-1, C, h, w) clean latents, one per row of `targets`. The UNet must carry no LoRA
    and the default attention: these are the base model's images."""
    steps = config.endpoint_steps
    done = [0]
    total = 2 * steps

    def step(_: int, __: int) -> None:
        done[0] += 1
        if on_step:
            on_step(done[0], total)

    invert_predict = guided_predictor(unet, source, unconditional, 1.0, stop)
    inverted = ddim_invert(schedule, invert_predict, latent, config.num_inference_steps, step, last_steps=steps)
    start = inverted.expand(len(targets), *inverted.shape[1:]).contiguous()
    sample_predict = guided_predictor(unet, targets, unconditional, config.endpoint_guidance, stop)
    return ddim_sample(schedule, sample_predict, start, config.num_inference_steps, step, last_steps=steps)
