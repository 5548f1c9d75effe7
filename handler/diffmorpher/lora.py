"""Step 1: fit one LoRA per image on the UNet attention projections with peft.

The LoRA captures the image's identity (paper Sec. 3.1): it is trained to denoise that single
image, so loading it makes the model's prior centred on that image, and interpolating two such
LoRAs gives a semantically meaningful path between the images.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from PIL import Image

from .config import LORA_TARGET_MODULES, MorphConfig
from .ddim import NoiseSchedule, as_schedule
from .preprocess import to_model_square

ADAPTER_NAME = "diffmorpher_fit"

# on_step(step, total, loss): `loss` stays a (detached) device tensor; turning it into a Python
# number is the callback's choice, since it waits for the device.
LoraStepCallback = Callable[[int, int, torch.Tensor], None]


def fit_lora(
    unet: UNet2DConditionModel,
    scheduler: "DDIMScheduler | NoiseSchedule",
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    text_embedding: torch.Tensor,
    config: MorphConfig,
    seed: int,
    on_step: LoraStepCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Train a rank-r LoRA to denoise one image; return its tensors (peft state-dict keys, cpu).

    `latent_mean`/`latent_std` are the VAE posterior of the image, already scaled by the VAE
    scaling factor; each step samples from it (as the authors do). AdamW with the paper's
    hyper-parameters, constant learning rate, MSE to the noise (or to v for v-prediction).
    The UNet is left without adapters afterwards.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noising = ForwardNoising(scheduler, latent_mean.device)
    with fitting_adapter(unet, config, seed) as params:
        optimizer = torch.optim.AdamW(
            params, lr=config.lora_lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        for step in range(config.lora_steps):
            with torch.enable_grad():
                loss = training_loss(unet, noising, latent_mean, latent_std, text_embedding, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if on_step:
                on_step(step + 1, config.lora_steps, loss.detach())
        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
        return {key: value.detach().float().cpu().contiguous() for key, value in state.items()}


@contextmanager
def fitting_adapter(unet: UNet2DConditionModel, config: MorphConfig, seed: int) -> Iterator[list[torch.nn.Parameter]]:
    """A fresh trainable LoRA adapter on the UNet (its parameters in fp32, whatever the UNet's
    dtype, so the optimiser state is fp32); removed again on exit, whatever happens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft initialises lora_A from the global generator
        unet.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_rank,
                init_lora_weights=True,
                target_modules=list(LORA_TARGET_MODULES),
            ),
            adapter_name=ADAPTER_NAME,
        )
    try:
        params = [p for name, p in unet.named_parameters() if ADAPTER_NAME in name]
        for param in params:
            param.data = param.data.float()
            param.requires_grad_(True)
        yield params
    finally:
        unet.unload_lora()
        unet.requires_grad_(False)


def training_loss(
    unet: UNet2DConditionModel,
    noising: "ForwardNoising",
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    text_embedding: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One step's loss: a sample of the image's posterior, noised at a random timestep (drawn on
    the CPU generator, so a seed gives the same LoRA on every device), and the MSE of the UNet's
    prediction to the target, in fp32. Device tensors only: nothing is read back to the host."""
    latents = latent_mean + latent_std * _randn_like(latent_mean, generator)
    noise = _randn_like(latent_mean, generator)
    timestep = torch.randint(0, len(noising.alphas), (1,), generator=generator).to(latent_mean.device)
    noisy, target = noising(latents, noise, timestep)
    prediction = unet(noisy, timestep, encoder_hidden_states=text_embedding).sample
    return F.mse_loss(prediction.float(), target.float())


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: "DDIMScheduler | NoiseSchedule",
    latents: torch.Tensor,
    text_embedding: torch.Tensor,
    timesteps: list[int],
    seed: int,
) -> float:
    """Mean denoising MSE of the UNet on fixed (noise, timestep) draws: the objective LoRA
    fitting lowers, used to check that it did."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noising = ForwardNoising(scheduler, latents.device)
    losses = []
    with torch.no_grad():
        for t in timesteps:
            noise = _randn_like(latents, generator)
            timestep = torch.tensor([t], device=latents.device)
            noisy, target = noising(latents, noise, timestep)
            prediction = unet(noisy, timestep, encoder_hidden_states=text_embedding).sample
            losses.append(F.mse_loss(prediction.float(), target.float()))
    return float(torch.stack(losses).mean())


class ForwardNoising:
    """q(x_t | x_0) and the training target (noise, or v for v-prediction models), from an
    alpha_bar table put on the device once. diffusers' `scheduler.add_noise` would move the
    shared scheduler's table to the device as a side effect, after which every host-side
    read of it (the DDIM step plan) waits for the GPU."""

    def __init__(self, scheduler: "DDIMScheduler | NoiseSchedule", device: torch.device) -> None:
        schedule = as_schedule(scheduler)
        self.prediction_type = schedule.prediction_type
        self.alphas = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32).to(device)

    def __call__(
        self, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas[timestep].reshape(-1, *([1] * (latents.ndim - 1)))
        sqrt_a, sqrt_1ma = a.sqrt().to(latents.dtype), (1 - a).sqrt().to(latents.dtype)
        noisy = sqrt_a * latents + sqrt_1ma * noise
        target = sqrt_a * noise - sqrt_1ma * latents if self.prediction_type == "v_prediction" else noise
        return noisy, target


def _randn_like(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise drawn on the CPU generator, so a seed gives the same LoRA on every device."""
    return torch.randn(like.shape, generator=generator).to(device=like.device, dtype=like.dtype)


def lora_cache_key(
    image: Image.Image, prompt: str, model_id: str, config: MorphConfig, resolution: int
) -> str:
    """Content address of a fitted LoRA: what the model saw (the preprocessed pixels), the
    prompt, the model, and every hyper-parameter that changes the result.

    The authors' code cached LoRAs by output-folder name, so a new image could silently reuse
    an old LoRA; a content hash cannot. Used by LoRA caches shared between workers/replicas.
    """
    return _content_key(image, resolution, {
        "prompt": prompt, "model": model_id, "resolution": resolution, "rank": config.lora_rank,
        "steps": config.lora_steps, "lr": config.lora_lr, "seed": config.seed, "dtype": config.dtype,
        "targets": list(LORA_TARGET_MODULES), "version": 1,
    })


def inversion_cache_key(
    image: Image.Image, prompt: str, model_id: str, config: MorphConfig, resolution: int,
    lora_key: str | None,
) -> str:
    """Content address of an image's DDIM-inverted latent: its pixels, prompt, model, the
    number of steps, and the LoRA it was inverted with (its own, or none)."""
    return _content_key(image, resolution, {
        "prompt": prompt, "model": model_id, "resolution": resolution, "dtype": config.dtype,
        "steps": config.num_inference_steps, "lora": lora_key, "kind": "inversion", "version": 1,
    })


def _content_key(image: Image.Image, resolution: int, settings: dict) -> str:
    """SHA-256 of the pixels the model sees and of the settings (as sorted JSON)."""
    digest = hashlib.sha256()
    digest.update(to_model_square(image, resolution).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()

