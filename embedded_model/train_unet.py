"""Stage 2: train the UNet (and, jointly, the text encoder) on precomputed VAE latents.

Why train the text encoder too: a frozen random encoder mixes colour and shape tokens in ways
the UNet must untangle from scratch; training it lets colour and shape words become separable
directions, which is what held-out colour/shape pairs need.

Training follows SD: epsilon prediction, SD's scaled_linear noise schedule over 1000 steps,
prompts tokenised exactly as StableDiffusionPipeline does (padded to 77 tokens, no attention
mask), 10% empty captions so classifier-free guidance works. Three additions make a short CPU
run converge: Min-SNR-5 loss weighting (Hang et al. 2023), an EMA of the weights (what gets
saved), and offset noise (Guttenberg 2023): a per-channel constant added to the noise. Why the
last: SD's schedule leaves signal at t=999 (sqrt(alpha_bar) = 0.068), and on a 16x16 latent the
image mean (the background colour) is readable through it, so a model trained without offset
noise learns to copy the mean of its starting noise and draws random background and shape
colours from pure noise. Offset noise makes it predict (and so correct) the mean itself.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .architecture import make_scheduler, make_text_encoder, make_unet

CAPTION_DROPOUT = 0.1
OFFSET_NOISE = 0.1
MIN_SNR_GAMMA = 5.0


@dataclass
class UnetResult:
    unet: UNet2DConditionModel  # EMA weights
    text_encoder: CLIPTextModel  # EMA weights
    final_loss: float  # mean unweighted epsilon MSE over the last 100 steps
    seconds: float
    steps: int


@dataclass
class BlendBatch:
    """Blend scenes (blends.py) for training: unscaled VAE latents, the captions of each blend's
    two ends and its t. A blend is conditioned on lerp(text(a), text(b), t) of the text
    encoder's outputs, the hidden states that both cross-attention and the UNet's
    `addition_embed_type="text"` pooling read, which is what the morph's lerped text is."""

    latents: torch.Tensor
    captions_a: list[str]
    captions_b: list[str]
    ts: torch.Tensor  # (N,) float


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _lr_scale(step: int, steps: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_unet(
    latents: torch.Tensor,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    scaling_factor: float,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    text_lr: float = 5e-4,
    ema_decay: float = 0.998,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    init: tuple[UNet2DConditionModel, CLIPTextModel] | None = None,
    warmup: int = 100,
    offset_noise: float = OFFSET_NOISE,
    blends: BlendBatch | None = None,
    blend_fraction: float = 0.0,
) -> UnetResult:
    """Train for `steps` steps, or (if `steps` is None) for as many as fit in `seconds`; the
    learning-rate schedule is then laid out over the step count the first 20 steps predict.

    `latents` are the VAE's unscaled latent means; they are multiplied by `scaling_factor`
    (unit variance) as in SD.

    With `blends` and `blend_fraction` > 0, round(batch_size * blend_fraction) samples of each
    batch are blend scenes on lerped text (caption dropout empties both ends); with either off,
    every random draw is the same as without them.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler: DDIMScheduler = make_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # Min-SNR for epsilon prediction

    n_blend = round(batch_size * blend_fraction) if blends is not None else 0
    n_plain = batch_size - n_blend
    blend_captions = set(blends.captions_a) | set(blends.captions_b) if n_blend else set()
    unique = sorted(set(captions) | blend_captions) + [""]
    index_of = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index_of[c] for c in captions])
    empty_id = len(unique) - 1
    all_tokens = tokenize(tokenizer, unique).to(device)

    if init is None:
        unet, text_encoder = make_unet(), make_text_encoder()
    else:  # continue training saved weights (their EMA), with a fresh optimizer
        unet, text_encoder = init
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
    unet = unet.to(device).train()
    text_encoder = text_encoder.to(device).train()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": lr, "base_lr": lr},
            {"params": text_encoder.parameters(), "lr": text_lr, "base_lr": text_lr},
        ],
        weight_decay=1e-2,
    )
    data = latents * scaling_factor
    if n_blend:
        blend_data = blends.latents * scaling_factor
        blend_a = torch.tensor([index_of[c] for c in blends.captions_a])
        blend_b = torch.tensor([index_of[c] for c in blends.captions_b])
        blend_t = blends.ts.float()
    planned = steps if steps is not None else 10**9
    recent: list[float] = []
    start = time.perf_counter()
    step = 0
    while step < planned:
        if steps is None and step == 20:
            per_step = (time.perf_counter() - start) / 20
            planned = max(21, int(seconds / per_step))  # type: ignore[operator]
            log(f"unet: {per_step:.3f}s/step -> {planned} steps in {seconds:.0f}s")
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_scale(step, planned, warmup)
        idx = torch.randint(0, data.shape[0], (n_plain,), generator=generator)
        x0 = data[idx].to(device)
        cap = caption_ids[idx].clone()
        cap[torch.rand(n_plain, generator=generator) < CAPTION_DROPOUT] = empty_id
        if n_blend:
            bidx = torch.randint(0, blend_data.shape[0], (n_blend,), generator=generator)
            ends = torch.stack([blend_a[bidx], blend_b[bidx]])  # (2, n_blend)
            ends[:, torch.rand(n_blend, generator=generator) < CAPTION_DROPOUT] = empty_id
            cap = torch.cat([cap, ends[0], ends[1]])
            x0 = torch.cat([x0, blend_data[bidx].to(device)])
        used, inverse = torch.unique(cap, return_inverse=True)
        embeddings = text_encoder(all_tokens[used.to(device)])[0][inverse.to(device)]
        if n_blend:
            plain, end_a, end_b = embeddings.split([n_plain, n_blend, n_blend])
            t_blend = blend_t[bidx].to(device)[:, None, None]
            embeddings = torch.cat([plain, torch.lerp(end_a, end_b, t_blend)])
        noise = torch.randn(x0.shape, generator=generator)
        noise += offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
        noise = noise.to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,),
                          generator=generator)
        noisy = scheduler.add_noise(x0, noise, t.to(device))
        prediction = unet(noisy, t.to(device), embeddings).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t].to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(unet.parameters()) + list(text_encoder.parameters()), 1.0
        )
        optimizer.step()
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        recent = (recent + [per_sample.mean().item()])[-100:]
        if step % 100 == 0 or step == planned - 1:
            log(f"unet step {step}/{planned} eps-mse {np.mean(recent):.4f} "
                f"({time.perf_counter() - start:.0f}s)")
        step += 1
    return UnetResult(ema_unet, ema_text, float(np.mean(recent)), time.perf_counter() - start, step)
