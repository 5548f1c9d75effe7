"""Interpolation of the morph's inputs between endpoints (paper Sec. 3.2-3.3).

Every function takes a batch of alphas so that the frames of a pass are computed together; each
sample gets its own alpha. Tensors in, tensors out, so tests can check them with numbers.
"""

from __future__ import annotations

import torch

from .devices import widest_float


def _per_sample(alphas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) alphas shaped to broadcast against a (B, ...) tensor."""
    return alphas.reshape(-1, *([1] * (like.dim() - 1)))


def lerp(x0: torch.Tensor, x1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """(1 - a) * x0 + a * x1 for each alpha: (1, ...) endpoints -> (B, ...)."""
    a = _per_sample(alphas.to(device=x0.device, dtype=x0.dtype), x0)
    return (1 - a) * x0 + a * x1


def slerp(
    z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor, precision: torch.dtype | None = None
) -> torch.Tensor:
    """Spherical interpolation of noise latents, treating each sample's whole tensor as one vector.

    Gaussian noise of high dimension lives near a sphere; lerp would shrink the norm mid-way and
    give the sampler out-of-distribution noise. Endpoints are (1, ...) or (B, ...) tensors (one
    pair per sample: frames of different segments in one batch); the result is (B, ...).

    Precision: the angle between two independent noises is close to 90 degrees. It is taken as
    theta = 2 * atan2(|u0 - u1|, |u0 + u1|) of the unit vectors, which keeps full relative
    precision at every angle (arccos of a dot product loses it near 0 and 180 degrees), and the
    weights sin((1 - a) theta) / sin(theta), sin(a theta) / sin(theta) are then accurate to the
    working precision: float64 where the device has it, float32 where it does not (Apple MPS),
    which tests hold to the float64 reference (`precision` picks one; default: the device's
    widest, devices.widest_float). Falls back to lerp where the two are (anti)parallel
    and the formula is 0/0, chosen on the device (no read back to the host). `alphas` should be
    on the latents' device already (moved once per batch by the caller).
    """
    out_dtype = z0.dtype
    work = precision or widest_float(z0.device)
    a = alphas.to(device=z0.device, dtype=work).reshape(-1, 1)
    v0 = z0.reshape(len(z0), -1).to(work)
    v1 = z1.reshape(len(z1), -1).to(work)
    u0 = v0 / v0.norm(dim=1, keepdim=True)
    u1 = v1 / v1.norm(dim=1, keepdim=True)
    theta = 2 * torch.atan2((u0 - u1).norm(dim=1, keepdim=True), (u0 + u1).norm(dim=1, keepdim=True))
    sin_theta = torch.sin(theta)
    parallel = sin_theta.abs() < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    w0 = torch.where(parallel, 1 - a, torch.sin((1 - a) * theta) / safe_sin)
    w1 = torch.where(parallel, a, torch.sin(a * theta) / safe_sin)
    mixed = w0 * v0 + w1 * v1
    return mixed.reshape(-1, *z0.shape[1:]).to(out_dtype)


def channel_stats(z: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over the spatial dims of a (B, C, H, W) latent."""
    mean = z.mean(dim=(2, 3), keepdim=True)
    std = z.std(dim=(2, 3), keepdim=True) + eps
    return mean, std


def adain(z: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor) -> torch.Tensor:
    """Instance-normalise z per channel, then give it the target statistics (AdaIN)."""
    mean, std = channel_stats(z)
    return (z - mean) / std * target_std + target_mean


def interpolate_latents(
    z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor, use_adain: bool
) -> torch.Tensor:
    """The initial noise of each frame: slerp, then (optionally) AdaIN to lerped statistics.
    z0/z1: (1, ...) or one pair per sample (B, ...); alphas (B,) on their device.

    Slerp keeps the norm but not the per-channel mean/std of the two inverted latents, which
    carry global colour; AdaIN restores them, interpolated linearly (paper Sec. 3.3).
    """
    z = slerp(z0, z1, alphas)
    if not use_adain:
        return z
    mean0, std0 = channel_stats(z0.float())
    mean1, std1 = channel_stats(z1.float())
    a = _per_sample(alphas.to(device=z.device, dtype=torch.float32), z)
    target_mean = (1 - a) * mean0 + a * mean1
    target_std = (1 - a) * std0 + a * std1
    return adain(z.float(), target_mean, target_std).to(z.dtype)


def interpolate_lora(
    lora0: dict[str, torch.Tensor], lora1: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The paper's LoRA interpolation: every parameter (down and up matrices) lerped.

    The morph itself never builds these weights per frame (see lora_mix.py, which gets the same
    output from per-sample scalars); this is the reference definition, and what a user who
    wants a single mixed LoRA file gets.
    """
    if lora0.keys() != lora1.keys():
        missing = sorted(set(lora0) ^ set(lora1))[:5]
        raise ValueError(f"the two LoRAs have different parameters, e.g. {missing}")
    return {key: (1 - alpha) * lora0[key] + alpha * lora1[key] for key in lora0}
