"""Deterministic DDIM sampling and inversion over the same timesteps.

One step moves a latent from noise level alpha_bar_from to alpha_bar_to using the model's
prediction at the starting point (Song et al. 2021, eq. 12 with eta = 0):

    x0_hat = (x - sqrt(1 - a_from) * eps) / sqrt(a_from)
    x_to   = sqrt(a_to) * x0_hat + sqrt(1 - a_to) * eps

Sampling walks the timesteps downwards; inversion walks the *same* timesteps upwards with the
same formula, which is what makes inversion followed by sampling reproduce the image.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler

# predict(latents, timestep, step_index) -> model output (epsilon or v)
Predictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int], None]


def ddim_timesteps(scheduler: DDIMScheduler, num_inference_steps: int) -> torch.Tensor:
    """The sampler's timesteps (descending), from a private copy of the scheduler."""
    copy = DDIMScheduler.from_config(scheduler.config)
    copy.set_timesteps(num_inference_steps)
    return copy.timesteps.clone()


def alpha_bar(scheduler: DDIMScheduler, timestep: int) -> float:
    """alpha_bar at a timestep; below 0 it is the scheduler's final alpha (the clean image)."""
    if timestep >= 0:
        return float(scheduler.alphas_cumprod[timestep])
    return float(scheduler.final_alpha_cumprod)


def split_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, a_t: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the model output, for epsilon- and v-prediction models."""
    sqrt_a, sqrt_1ma = a_t**0.5, (1 - a_t) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    sample: torch.Tensor, model_output: torch.Tensor, a_from: float, a_to: float, prediction_type: str
) -> torch.Tensor:
    x0, eps = split_prediction(model_output, sample, a_from, prediction_type)
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def _previous(scheduler: DDIMScheduler, timestep: int, num_inference_steps: int) -> int:
    return timestep - scheduler.config.num_train_timesteps // num_inference_steps


def ddim_sample(
    scheduler: DDIMScheduler,
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from the noisiest timestep to the clean latent."""
    return _walk(scheduler, predict, latents, num_inference_steps, on_step, invert=False)


def ddim_invert(
    scheduler: DDIMScheduler,
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run the sampler's steps backwards: clean latent -> noise latent z_T.

    At each timestep t (ascending) the latent is at the level of the step below t; the model is
    evaluated there with timestep label t (the label the sampler uses when it leaves t), and the
    step formula moves the latent up to level t.
    """
    return _walk(scheduler, predict, latents, num_inference_steps, on_step, invert=True)


def _walk(
    scheduler: DDIMScheduler,
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None,
    *,
    invert: bool,
) -> torch.Tensor:
    """The sampler's steps in order, or in reverse order with each step run backwards. The
    predictor is told the sampler's step index of each timestep in both directions."""
    timesteps = ddim_timesteps(scheduler, num_inference_steps)
    prediction_type = scheduler.config.prediction_type
    order = range(len(timesteps) - 1, -1, -1) if invert else range(len(timesteps))
    for done, index in enumerate(order, start=1):
        t = int(timesteps[index])
        output = predict(latents, timesteps[index], index)
        a_t = alpha_bar(scheduler, t)
        a_prev = alpha_bar(scheduler, _previous(scheduler, t, num_inference_steps))
        a_from, a_to = (a_prev, a_t) if invert else (a_t, a_prev)
        latents = ddim_step(latents, output, a_from, a_to, prediction_type)
        if on_step:
            on_step(done, len(timesteps))
    return latents
