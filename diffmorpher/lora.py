"""Step 1: fit one LoRA per image on the UNet attention projections with peft.

The LoRA captures the image's identity (paper Sec. 3.1): it is trained to denoise that single
image, so loading it makes the model's prior centred on that image, and interpolating two such
LoRAs gives a semantically meaningful path between the images.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from .attention import AttentionStore, MorphController, morph_attention
from .conditioning import PromptConditioning
from .config import LORA_TARGET_MODULES, MorphConfig
from .ddim import NoiseSchedule, as_schedule
from .lora_mix import OWN_LORA, SHARED_LORA, LoraStack, LoraWeights
from .preprocess import to_model_square
from .transfer import move_together, row_index

ADAPTER_NAME = "diffmorpher_fit"  # peft's name for the adapter that gives the initial LoRA

DRAW_BLOCK_STEPS = 50  # LoRA steps whose random draws go to the device in one copy (a few MB at 512 px)

# on_step(step, total, losses): the (K,) per-image losses stay a (detached) device tensor; turning
# them into Python numbers is the callback's choice, since it waits for the device.
LoraStepCallback = Callable[[int, int, torch.Tensor], None]


def fit_loras(
    unet: UNet2DConditionModel,
    scheduler: "DDIMScheduler | NoiseSchedule",
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    conditioning: PromptConditioning,
    config: MorphConfig,
    seed: int,
    on_step: LoraStepCallback | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train one rank-r LoRA per image to denoise that image; return their tensors (peft
    state-dict keys, fp32 on the CPU). The UNet is left as it was.

    `latent_mean`/`latent_std` (K, C, h, w) are the images' VAE posteriors, already scaled by
    the VAE scaling factor; each step samples from them (as the authors do). AdamW with the
    paper's hyper-parameters, constant learning rate, MSE to the noise (or to v for
    v-prediction).

    The K images are fitted together, one UNet call per step, each sample through its own LoRA
    (the per-sample mixing of lora_mix with OWN_LORA), and this equals K separate fits: every
    LoRA starts from the same peft initialisation (the seed), each image draws its noise and
    timesteps from its own generator seeded alike, the loss is the sum of the per-image losses
    (so each LoRA gets exactly its own gradient) and AdamW works element-wise; tests compare a
    batch with fits of one image each. `on_step` gets the (K,) per-image losses.
    """
    count, device = len(latent_mean), latent_mean.device
    stacks = initial_lora_stacks(unet, config, seed, count, device)
    optimizer = _optimizer([tensor for stack in stacks.values() for tensor in (stack.down, stack.up)], config)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(count)]
    noising = ForwardNoising(scheduler, device)
    with lora_training(unet, stacks):
        for start in range(0, config.lora_steps, DRAW_BLOCK_STEPS):
            block = min(DRAW_BLOCK_STEPS, config.lora_steps - start)
            for offset, draws in enumerate(draw_steps(generators, latent_mean, len(noising.alphas), block)):
                with torch.enable_grad():
                    losses = training_losses(unet, noising, latent_mean, latent_std, conditioning, draws)
                    optimizer.zero_grad(set_to_none=True)
                    losses.sum().backward()
                    optimizer.step()
                if on_step:
                    on_step(start + offset + 1, config.lora_steps, losses.detach())
    return stacks_on_host(stacks, count)


def fit_shared_lora(
    unet: UNet2DConditionModel,
    scheduler: "DDIMScheduler | NoiseSchedule",
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    conditioning: PromptConditioning,
    config: MorphConfig,
    seed: int,
    rows_per_call: int,
    on_step: LoraStepCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Train one rank-r LoRA on all K images together (shared_lora), each with its own prompt's
    conditioning; return its tensors (peft state-dict keys, fp32 on the CPU).

    `config.lora_steps` AdamW steps (the paper's hyper-parameters, as fit_loras), each on a batch
    of all K images: one posterior sample, noise and timestep per image, and the mean of the K
    per-image losses. Each image is thus seen lora_steps times, as by its own fit, and the fit
    runs as many UNet rows as K per-image fits. The draws come from one generator seeded by
    `seed`, image after image (per-image fits give every image the same draws from its own
    generator; in one batch that would put all images at the same timestep). The K rows go
    through the UNet `rows_per_call` at a time with their gradients accumulated, so the split
    changes nothing but rounding. `on_step` gets the (K,) per-image losses."""
    count, device = len(latent_mean), latent_mean.device
    stacks = initial_lora_stacks(unet, config, seed, 1, device)
    optimizer = _optimizer([tensor for stack in stacks.values() for tensor in (stack.down, stack.up)], config)
    generators = [torch.Generator(device="cpu").manual_seed(seed)] * count  # one stream, image after image
    noising = ForwardNoising(scheduler, device)
    parts = [list(range(start, min(start + rows_per_call, count))) for start in range(0, count, rows_per_call)]
    with lora_training(unet, stacks, SHARED_LORA):
        for start in range(0, config.lora_steps, DRAW_BLOCK_STEPS):
            block = min(DRAW_BLOCK_STEPS, config.lora_steps - start)
            for offset, draws in enumerate(draw_steps(generators, latent_mean, len(noising.alphas), block)):
                optimizer.zero_grad(set_to_none=True)
                losses = []
                for rows in parts:
                    index = row_index(rows)
                    with torch.enable_grad():
                        part = training_losses(unet, noising, latent_mean[index], latent_std[index],
                                               conditioning.select(rows), draws.rows(index))
                        (part.sum() / count).backward()
                    losses.append(part.detach())
                optimizer.step()
                if on_step:
                    on_step(start + offset + 1, config.lora_steps, torch.cat(losses))
    return stacks_on_host(stacks, 1)[0]


def stacks_on_host(stacks: dict[str, LoraStack], count: int) -> list[dict[str, torch.Tensor]]:
    """The `count` LoRAs of trained stacks as peft state dicts, fp32 on the CPU."""
    names = [f"{module}.{part}.weight" for module in stacks for part in ("lora_A", "lora_B")]
    fitted = [tensor.detach().float() for stack in stacks.values() for tensor in (stack.down, stack.up)]
    on_host = move_together(fitted, torch.device("cpu"))  # one copy back, not one per tensor
    return [{name: tensor[k].clone() for name, tensor in zip(names, on_host)} for k in range(count)]


def initial_lora_stacks(
    unet: UNet2DConditionModel, config: MorphConfig, seed: int, count: int, device: torch.device
) -> dict[str, LoraStack]:
    """`count` copies of peft's initial LoRA for the seed, as trainable fp32 stacks by module
    (fp32 whatever the UNet's dtype, so the optimiser state is fp32). peft initialises lora_A
    from the global generator: it is seeded in a fork, leaving the caller's stream alone; the
    adapter is removed again, whatever happens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
        initial = {k: v.detach().float() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    finally:
        unet.unload_lora()
        unet.requires_grad_(False)
    modules = [key[: -len(".lora_A.weight")] for key in sorted(initial) if key.endswith(".lora_A.weight")]
    host = [initial[f"{module}.{part}.weight"] for module in modules for part in ("lora_A", "lora_B")]
    on_device = move_together(host, device)  # one copy, not two per module
    stacks: dict[str, LoraStack] = {}
    for i, module in enumerate(modules):
        down, up = (t.unsqueeze(0).repeat(count, 1, 1).requires_grad_(True) for t in on_device[2 * i : 2 * i + 2])
        stacks[module] = LoraStack(down=down, up=up)
    return stacks


@contextmanager
def lora_training(
    unet: UNet2DConditionModel, stacks: dict[str, LoraStack], weights: LoraWeights = OWN_LORA
) -> Iterator[MorphController]:
    """The UNet with row k of every batch through LoRA k of `stacks` (OWN_LORA), or every row
    through its one LoRA (SHARED_LORA); attention processors restored on exit."""
    controller = MorphController(AttentionStore(num_images=0, num_steps=0), lora_weights=weights)  # stores nothing
    with morph_attention(unet, controller, stacks):
        yield controller


def _optimizer(params: list[torch.Tensor], config: MorphConfig) -> torch.optim.Optimizer:
    """AdamW with the paper's hyper-parameters and a constant learning rate."""
    return torch.optim.AdamW(params, lr=config.lora_lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


@dataclass(frozen=True)
class StepDraws:
    """One LoRA step's random draws for K images, on the device."""

    posterior: torch.Tensor  # (K, C, h, w) standard normal: each image's sample of its posterior
    noise: torch.Tensor  # (K, C, h, w) the noise added at the timestep
    timesteps: torch.Tensor  # (K,) int64 in [0, num_train_timesteps)

    def rows(self, index: slice | list[int]) -> "StepDraws":
        """The draws of some of the images (a slice or list of rows, transfer.row_index)."""
        return StepDraws(self.posterior[index], self.noise[index], self.timesteps[index])


def draw_steps(
    generators: list[torch.Generator], like: torch.Tensor, num_train_timesteps: int, num_steps: int
) -> list[StepDraws]:
    """`num_steps` steps' draws for the K images of `like` (K, C, h, w), image k from
    generators[k] on the CPU in the order its steps take them (posterior sample, noise,
    timestep), so a seed gives the same LoRA on every device and whether an image is fitted
    alone or with others. They reach the device in two copies for all the steps (noise in
    `like`'s dtype, timesteps), not three per image per step: each copy from pageable host
    memory waits for the device."""
    shape = (1, *like.shape[1:])
    noise, timesteps = [], []
    for _ in range(num_steps):
        per_image = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                      torch.randint(0, num_train_timesteps, (1,), generator=g)) for g in generators]
        noise.append(torch.stack([torch.cat([posterior, added]) for posterior, added, _ in per_image]))
        timesteps.append(torch.cat([timestep for _, _, timestep in per_image]))
    noise_on_device = torch.stack(noise).to(dtype=like.dtype).to(like.device)  # (S, K, 2, C, h, w)
    timesteps_on_device = torch.stack(timesteps).to(like.device)  # (S, K)
    return [StepDraws(noise_on_device[step, :, 0], noise_on_device[step, :, 1], timesteps_on_device[step])
            for step in range(num_steps)]


def training_losses(
    unet: UNet2DConditionModel,
    noising: "ForwardNoising",
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    conditioning: PromptConditioning,
    draws: StepDraws,
) -> torch.Tensor:
    """One step's (K,) per-image losses: a sample of each image's posterior, noised at a random
    timestep, and the MSE of the UNet's prediction to the target, in fp32. Device tensors only:
    nothing is read back to the host, nothing is copied to the device."""
    latents = latent_mean + latent_std * draws.posterior
    noisy, target = noising(latents, draws.noise, draws.timesteps)
    prediction = unet(noisy, draws.timesteps, **conditioning.unet_kwargs()).sample
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: "DDIMScheduler | NoiseSchedule",
    latents: torch.Tensor,
    conditioning: PromptConditioning,
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
            prediction = unet(noisy, timestep, **conditioning.unet_kwargs()).sample
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


def shared_lora_cache_key(
    images: Sequence[Image.Image], prompts: Sequence[str], model_id: str, config: MorphConfig, resolution: int
) -> str:
    """Content address of a shared LoRA (shared_lora): the pixels of every image the model sees,
    in order (the fit draws its noise image after image), all the prompts, the model and every
    hyper-parameter that changes the result. Changing any one image changes the key."""
    digest = hashlib.sha256()
    for image in images:  # squares of one size: the concatenation is unambiguous
        digest.update(to_model_square(image, resolution).tobytes())
    digest.update(json.dumps({
        "prompts": list(prompts), "model": model_id, "resolution": resolution, "rank": config.lora_rank,
        "steps": config.lora_steps, "lr": config.lora_lr, "seed": config.seed, "dtype": config.dtype,
        "targets": list(LORA_TARGET_MODULES), "kind": "shared_lora", "version": 1,
    }, sort_keys=True).encode())
    return digest.hexdigest()


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


def endpoint_cache_key(
    image: Image.Image, source_prompt: str, target_prompt: str, model_id: str, config: MorphConfig, resolution: int
) -> str:
    """Content address of an endpoint made from an image for another prompt (endpoints.py):
    the image's pixels, both prompts, the model and every option the generation reads."""
    return _content_key(image, resolution, {
        "source": source_prompt, "target": target_prompt, "model": model_id, "resolution": resolution,
        "dtype": config.dtype, "steps": config.num_inference_steps, "strength": config.endpoint_strength,
        "guidance": config.endpoint_guidance, "seed": config.seed, "kind": "endpoint", "version": 1,
    })


def image_cache_key(image: Image.Image, resolution: int) -> str:
    """Content address of the image as the model sees it (the preprocessed square): what a
    client sends back as an image reference to morph the image again without uploading it."""
    return _content_key(image, resolution, {"kind": "image", "resolution": resolution, "version": 1})


def _content_key(image: Image.Image, resolution: int, settings: dict) -> str:
    """SHA-256 of the pixels the model sees and of the settings (as sorted JSON)."""
    digest = hashlib.sha256()
    digest.update(to_model_square(image, resolution).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()

