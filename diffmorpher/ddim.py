"""Deterministic DDIM sampling and inversion over the same timesteps.

One step moves a latent from noise level alpha_bar_from to alpha_bar_to using the model's
prediction at the starting point (Song et al. 2021, eq. 12 with eta = 0):

    x0_hat = (x - sqrt(1 - a_from) * eps) / sqrt(a_from)
    x_to   = sqrt(a_to) * x0_hat + sqrt(1 - a_to) * eps

Sampling walks the timesteps downwards; inversion walks the *same* timesteps upwards with the
same formula, which is what makes inversion followed by sampling reproduce the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

# predict(latents, timestep, step_index) -> model output (epsilon or v)
Predictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int], None]


def ddim_timesteps(scheduler: DDIMScheduler, num_inference_steps: int) -> torch.Tensor:
    """The sampler's timesteps (descending), from a private copy of the scheduler; they follow
    the checkpoint's `timestep_spacing` (leading, trailing or linspace)."""
    copy = DDIMScheduler.from_config(scheduler.config)
    copy.set_timesteps(num_inference_steps)
    return copy.timesteps.clone()


@dataclass(frozen=True)
class StepPlan:
    """Everything a DDIM walk needs, as Python numbers, computed once before the loop:
    `timesteps` descending, `alphas[i]` / `previous_alphas[i]` the alpha_bar at timestep i
    and at the step after it (the next timestep of the sequence, or the final alpha), and
    `step_indices[i]` the index of step i in the full plan: the predictor is told that index,
    and the attention store is keyed by it."""

    timesteps: list[int]
    alphas: list[float]
    previous_alphas: list[float]
    step_indices: list[int]

    def coarse(self, num_steps: int) -> "StepPlan":
        """A shorter walk over `num_steps` of these timesteps: the first half of them (the
        noisiest steps, which lay out the image and, with lambda > 0, replace attention) kept
        one by one, the second half spread evenly over the rest, each step jumping straight to
        the next kept timestep (DDIM's update is valid for any jump). It keeps the full plan's
        step indices, so a coarse walk reads the attention that the endpoints store at them.
        The reschedule's measuring pass uses it: the same z_T, at a fraction of the UNet calls.
        (Measured on the fixed pairs, docs/quality.md: spreading all steps evenly moves the
        layout switches that the reschedule has to find; keeping the first steps does not.)"""
        count = len(self.timesteps)
        if num_steps >= count:
            return self
        if num_steps < 1:
            raise ValueError(f"a walk needs at least one step, got {num_steps}")
        head = num_steps // 2
        tail = num_steps - head
        keep = list(range(head)) + [head + int(i) for i in np.floor(np.arange(tail) * (count - head) / tail)]
        alphas = [self.alphas[i] for i in keep]
        return StepPlan(
            [self.timesteps[i] for i in keep], alphas, alphas[1:] + [self.previous_alphas[-1]],
            [self.step_indices[i] for i in keep],
        )

    def tail(self, num_steps: int) -> "StepPlan":
        """The last `num_steps` steps of this walk (the least noisy ones): an image-to-image
        pass inverts a clean latent over them and samples back over the same ones, so it
        starts from the noise level of step `len - num_steps` (SDEdit's "strength")."""
        if not 1 <= num_steps <= len(self.timesteps):
            raise ValueError(f"a walk of {len(self.timesteps)} steps has no tail of {num_steps}")
        start = len(self.timesteps) - num_steps
        return StepPlan(
            self.timesteps[start:], self.alphas[start:], self.previous_alphas[start:], self.step_indices[start:]
        )


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDIM scheduler's numbers as numpy and Python values, read from its tensors once (when
    the models load). Denoising loops and LoRA steps use these, so nothing in them reads a
    tensor back to the host (a GPU sync per step) or depends on where diffusers last moved the
    scheduler's tables (its `add_noise` moves them to the device)."""

    alphas_cumprod: np.ndarray  # float64, one per training timestep
    final_alpha: float
    timestep_spacing: str
    steps_offset: int
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler) -> "NoiseSchedule":
        table = scheduler.alphas_cumprod
        if table.device.type != "cpu":
            table = table.cpu()
        config = scheduler.config
        return cls(
            np.asarray(table.numpy(), dtype=np.float64), float(scheduler.final_alpha_cumprod),
            str(config.timestep_spacing), int(config.steps_offset), str(config.prediction_type),
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The sampler's timesteps, descending, for the checkpoint's `timestep_spacing` (the same
        numbers as DDIMScheduler.set_timesteps; a test compares them)."""
        total, count = self.num_train_timesteps, num_inference_steps
        if self.timestep_spacing == "linspace":
            steps = np.linspace(0, total - 1, count).round()[::-1]
        elif self.timestep_spacing == "leading":
            steps = (np.arange(0, count) * (total // count)).round()[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            steps = np.round(np.arange(total, 0, -total / count)) - 1
        else:
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")
        return [int(t) for t in steps.astype(np.int64)]

    def plan(self, num_inference_steps: int) -> StepPlan:
        timesteps = self.timesteps(num_inference_steps)
        alphas = [self.alpha(t) for t in timesteps]
        return StepPlan(timesteps, alphas, alphas[1:] + [self.final_alpha], list(range(len(timesteps))))


def as_schedule(scheduler: "DDIMScheduler | NoiseSchedule") -> NoiseSchedule:
    return scheduler if isinstance(scheduler, NoiseSchedule) else NoiseSchedule.from_scheduler(scheduler)


def plan_steps(scheduler: "DDIMScheduler | NoiseSchedule", num_inference_steps: int) -> StepPlan:
    return as_schedule(scheduler).plan(num_inference_steps)


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


def ddim_sample(
    scheduler: "DDIMScheduler | NoiseSchedule",
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None = None,
    walk_steps: int | None = None,
    last_steps: int | None = None,
) -> torch.Tensor:
    """Denoise from the noisiest timestep to the clean latent; with `walk_steps` fewer than
    `num_inference_steps`, over a coarse subset of the same timesteps (StepPlan.coarse); with
    `last_steps`, from the noise level of the plan's last `last_steps` steps (StepPlan.tail)."""
    return _walk(scheduler, predict, latents, num_inference_steps, on_step, invert=False, walk_steps=walk_steps,
                 last_steps=last_steps)


def ddim_invert(
    scheduler: "DDIMScheduler | NoiseSchedule",
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None = None,
    last_steps: int | None = None,
) -> torch.Tensor:
    """Run the sampler's steps backwards: clean latent -> noise latent z_T (with `last_steps`,
    only the plan's last `last_steps` steps: up to the noise level an image-to-image pass
    samples back from, StepPlan.tail).

    At each timestep t (ascending) the latent is at the level of the step below t; the model is
    evaluated there with timestep label t (the label the sampler uses when it leaves t), and the
    step formula moves the latent up to level t.
    """
    return _walk(scheduler, predict, latents, num_inference_steps, on_step, invert=True, last_steps=last_steps)


def _walk(
    scheduler: "DDIMScheduler | NoiseSchedule",
    predict: Predictor,
    latents: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None,
    *,
    invert: bool,
    walk_steps: int | None = None,
    last_steps: int | None = None,
) -> torch.Tensor:
    """The sampler's steps in order, or in reverse order with each step run backwards. The
    predictor is told the sampler's step index of each timestep in both directions. The
    timesteps go to the device once; inside the loop nothing is read back to the host."""
    schedule = as_schedule(scheduler)
    plan = schedule.plan(num_inference_steps)
    if walk_steps is not None:
        plan = plan.coarse(walk_steps)
    if last_steps is not None:
        plan = plan.tail(last_steps)
    timesteps = torch.tensor(plan.timesteps, device=latents.device)
    prediction_type = schedule.prediction_type
    count = len(plan.timesteps)
    order = range(count - 1, -1, -1) if invert else range(count)
    for done, index in enumerate(order, start=1):
        output = predict(latents, timesteps[index], plan.step_indices[index])
        a_t, a_prev = plan.alphas[index], plan.previous_alphas[index]
        a_from, a_to = (a_prev, a_t) if invert else (a_t, a_prev)
        latents = ddim_step(latents, output, a_from, a_to, prediction_type)
        if on_step:
            on_step(done, count)
    return latents
