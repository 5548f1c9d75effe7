"""Stage 1: train the AutoencoderKL on the generated shapes.

Why crops: the VAE is convolutional (its only attention is in the mid block, at latent
resolution), so most steps train on random 32x32 crops, a quarter of the compute of a full
64x64 image; the last 10% of steps train on whole images so the mid-block attention and the
GroupNorm statistics see what they will see at use. Loss: pixel MSE (what PSNR measures) plus
SD's tiny KL weight, which keeps latents bounded without blurring them.

Optionally (`ColourLerpData`, the `--vae-colour-lerp` option of `train`) a latent-interpolation
loss: for two scenes of one geometry in two colours, the decoder of lerp(E(a), E(b), t) and of
E(blend) must both draw the colour blend at t (blends.render_colour_blend). Why: every morph
lerps or slerps latents, so what the decoder draws between two latents is what a morph passes
through. Trained on reconstruction alone, this VAE put green between red and blue (the
decoded lerp of the demo's two latents goes red -> green -> purple -> blue, before any UNet
step). SD's VAE does not have that problem: its latents are close to a linear function of the
pixel colours.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from .architecture import make_vae

CROP = 32
KL_WEIGHT = 1e-6


@dataclass
class ColourLerpData:
    """Colour triplets (blends.generate_colour_triplets) for the latent-interpolation loss:
    images (N, 3, 3, H, W) in [-1, 1] (end a, end b, blend at t) and ts (N,)."""

    images: torch.Tensor
    ts: torch.Tensor
    batch_size: int = 8
    weight: float = 1.0

    @classmethod
    def from_triplets(cls, images: np.ndarray, ts: np.ndarray, **kwargs) -> "ColourLerpData":
        n, k, h, w, c = images.shape
        flat = to_tensor(images.reshape(n * k, h, w, c))
        return cls(flat.view(n, k, c, h, w), torch.from_numpy(ts).float(), **kwargs)

    def loss(self, vae: AutoencoderKL, generator: torch.Generator, crop: tuple[int, int] | None,
             device: str, frozen_encoder: bool = False) -> torch.Tensor:
        """Pixel MSE of decode(lerp(E(a), E(b), t)) and decode(E(blend)) against the blend."""
        idx = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=generator)
        images = self.images[idx]
        if crop is not None:
            top, left = crop
            images = images[..., top : top + CROP, left : left + CROP]
        images = images.to(device)
        k = self.batch_size
        with torch.set_grad_enabled(not frozen_encoder):
            means = vae.encode(images.flatten(0, 1)).latent_dist.mean
        means = means.view(k, 3, *means.shape[1:])
        t = self.ts[idx].to(device)[:, None, None, None]
        lerped = torch.lerp(means[:, 0], means[:, 1], t)
        decoded = vae.decode(torch.cat([lerped, means[:, 2]])).sample
        target = images[:, 2]
        return torch.nn.functional.mse_loss(decoded, torch.cat([target, target]))


@dataclass
class VaeResult:
    vae: AutoencoderKL
    final_loss: float  # mean reconstruction MSE (in [-1, 1] pixel units) over the last 50 steps
    seconds: float


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], SD's VAE input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def _lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_vae(
    images: np.ndarray,
    steps: int,
    batch_size: int = 32,
    full_size_fraction: float = 0.1,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    colour_lerp: ColourLerpData | None = None,
) -> VaeResult:
    """Train a fresh VAE for `steps` steps on `images` (uint8 NHWC); with `colour_lerp`, plus
    its latent-interpolation loss on the same crop (without it every random draw is as
    before)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = to_tensor(images)
    vae = make_vae().to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    size = data.shape[-1]
    first_full = int(steps * (1.0 - full_size_fraction))
    recent: list[float] = []
    recent_lerp: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        x = data[idx]
        crop = None
        if step < first_full:
            top, left = torch.randint(0, size - CROP + 1, (2,), generator=generator).tolist()
            x = x[:, :, top : top + CROP, left : left + CROP]
            crop = (top, left)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + KL_WEIGHT * posterior.kl().mean()
        if colour_lerp is not None:
            lerp_mse = colour_lerp.loss(vae, generator, crop, device)
            loss = loss + colour_lerp.weight * lerp_mse
            recent_lerp = (recent_lerp + [lerp_mse.item()])[-50:]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [mse.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            lerp_part = f" colour-lerp mse {np.mean(recent_lerp):.5f}" if recent_lerp else ""
            log(f"vae step {step}/{steps} mse {np.mean(recent):.5f}{lerp_part} "
                f"({time.perf_counter() - start:.0f}s)")
    vae.eval()
    return VaeResult(vae, float(np.mean(recent)), time.perf_counter() - start)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 128,
                   device: str = "cpu") -> torch.Tensor:
    """Unscaled latent means of all images: the UNet stage trains on these precomputed latents
    (the VAE is frozen by then), saving an encoder pass per step."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size]).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


@torch.no_grad()
def round_trip_psnr(vae: AutoencoderKL, images: np.ndarray, device: str = "cpu") -> float:
    """Mean PSNR of decode(encode(x).mean) over images."""
    values = []
    for i in range(0, len(images), 64):
        x = to_tensor(images[i : i + 64]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        values += [psnr(r, o) for r, o in zip(rec, x)]
    return float(np.mean(values))


def refine_decoder(
    vae: AutoencoderKL,
    images: np.ndarray,
    steps: int,
    batch_size: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    latent_noise: float = 0.1,
    colour_lerp: ColourLerpData | None = None,
) -> float:
    """Train only the decoder, on whole images decoded from the frozen encoder's latent means.

    Why: the encoder (and so every latent the UNet was trained on) stays exactly as it was, so
    this sharpens reconstructions after the UNet stage without invalidating it. Half of each
    batch gets Gaussian noise of `latent_noise` x the latents' std added to its latents, so
    the decoder also draws clean shapes from the slightly-off latents a sampler produces
    (without it, small latent errors decode to checkerboard textures). With `colour_lerp`
    its loss (through the frozen encoder) is kept up too, so the refinement does not undo
    what the decoder draws between latents. Returns the final reconstruction MSE of the
    noise-free half.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = to_tensor(images)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(decoder_params, lr=lr, weight_decay=0.0)
    vae.requires_grad_(False)
    for p in decoder_params:
        p.requires_grad_(True)
    vae.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=10)
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        x = data[idx].to(device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
            half = batch_size // 2
            noise = torch.randn(latents[half:].shape, generator=generator).to(device)
            latents[half:] += latent_noise * latents.std() * noise
        per_pixel = (vae.decode(latents).sample - x).pow(2)
        mse = per_pixel[:half].mean()
        loss = per_pixel.mean()
        if colour_lerp is not None:
            loss = loss + colour_lerp.weight * colour_lerp.loss(
                vae, generator, None, device, frozen_encoder=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder_params, 1.0)
        optimizer.step()
        recent = (recent + [mse.item()])[-50:]
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} mse {np.mean(recent):.5f} "
                f"({time.perf_counter() - start:.0f}s)")
    vae.requires_grad_(False)
    vae.eval()
    return float(np.mean(recent))
