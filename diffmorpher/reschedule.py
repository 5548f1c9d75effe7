"""Reschedule: re-space the alphas so perceptual change per frame is even (paper Sec. 3.4).

The first pass uses uniform alphas; transitions in diffusion latent space are not uniform in
image space (often a sudden jump mid-way). Given the distance between consecutive frames, the
cumulative distance is a monotone map alpha -> progress; inverting it at evenly spaced progress
levels gives alphas whose frames are evenly spaced in perceptual distance.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np


def reschedule_alphas(
    alphas: Sequence[float], distances: Sequence[float], num_frames: int | None = None
) -> list[float]:
    """New alphas from the piecewise-linear inverse of cumulative perceptual distance.

    `alphas` are the N alphas of the first pass (increasing, alphas[0] = 0, alphas[-1] = 1) and
    `distances` the N-1 distances between consecutive frames. Endpoints stay exactly 0 and 1.
    A sequence with no measurable change keeps its alphas (nothing to even out).
    """
    alphas_arr = np.asarray(alphas, dtype=np.float64)
    dist = np.asarray(distances, dtype=np.float64)
    if dist.shape != (len(alphas_arr) - 1,):
        raise ValueError(f"need {len(alphas_arr) - 1} distances for {len(alphas_arr)} alphas")
    if np.any(~np.isfinite(dist)) or np.any(dist < 0):
        raise ValueError("distances must be finite and non-negative")
    n = num_frames or len(alphas_arr)
    total = dist.sum()
    if total <= 0:
        return list(np.linspace(alphas_arr[0], alphas_arr[-1], n))
    progress = np.concatenate([[0.0], np.cumsum(dist) / total])
    levels = np.linspace(0.0, 1.0, n)
    new_alphas = np.interp(levels, progress, alphas_arr)
    new_alphas[0], new_alphas[-1] = alphas_arr[0], alphas_arr[-1]
    return [float(a) for a in new_alphas]


def uniform_alphas(num_frames: int) -> list[float]:
    return [float(a) for a in np.linspace(0.0, 1.0, num_frames)]


def schedule_cache_key(latent_keys: Sequence[str], options: dict[str, Any], metric: str) -> str:
    """Content address of a morph's rescheduled alphas: they follow from the images' inverted
    latents (whose keys cover pixels, prompts, model, LoRAs and steps), every morph option and
    the distance that measured them. A repeated morph then skips the measuring pass."""
    settings = {"latents": list(latent_keys), "options": options, "metric": metric, "kind": "schedule", "version": 1}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
