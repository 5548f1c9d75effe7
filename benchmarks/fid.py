"""FID between the input images and the generated frames (the paper's fidelity metric, Sec. 5).

Why a module of its own: FID needs an ImageNet Inception-v3, whose weights no machine of this
project can download, so the MorphBench runner must be able to say *why* FID is missing
(`FidUnavailable`, with the reason and how to enable it) instead of skipping it silently; and
the Frechet distance itself is plain arithmetic that tests can check with numbers.

Weights (torchvision's `inception_v3` ImageNet state dict, the file torchvision itself would
download: inception_v3_google-0cc3c7bd.pth), first match wins:
1. the explicit path (`--inception-weights`); if it is missing, nothing else is tried;
2. the file named by $DIFFMORPHER_INCEPTION_WEIGHTS (equally authoritative);
3. torchvision's own download cache, <torch hub dir>/checkpoints/inception_v3_google-0cc3c7bd.pth,
   if a previous torchvision download left it there.
Nothing is ever downloaded.

The numbers are FIDs with torchvision's Inception weights (pool3 features, 2048-d, images
resized to 299 px bilinearly): close to, but not the same as, the TF-Inception weights of
pytorch-fid and the paper, so compare them with each other, not with the paper's 54.69.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS_ENV = "DIFFMORPHER_INCEPTION_WEIGHTS"
TORCHVISION_FILENAME = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_SIDE = 299
FEATURE_DIM = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_ENABLE = (
    f"to compute FID, put torchvision's ImageNet inception_v3 weights ({TORCHVISION_FILENAME}, from "
    f"https://download.pytorch.org/models/{TORCHVISION_FILENAME}) on this machine and pass "
    f"--inception-weights PATH (make eval: EVAL_ARGS=\"--inception-weights PATH\") or set ${WEIGHTS_ENV}"
)


class FidUnavailable(RuntimeError):
    """FID cannot be computed here; str(error) says why and how to enable it."""


def torchvision_cache_path() -> Path:
    """Where a torchvision download of the Inception weights would have left them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILENAME


def resolve_inception_weights(explicit: str | Path | None = None) -> Path:
    """The weights file to use (see the module docstring), or FidUnavailable with the reason."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FidUnavailable(f"Inception weights {path} (--inception-weights) do not exist; {HOW_TO_ENABLE}")
        return path
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise FidUnavailable(f"Inception weights {path} (${WEIGHTS_ENV}) do not exist; {HOW_TO_ENABLE}")
        return path
    cached = torchvision_cache_path()
    if cached.is_file():
        return cached
    raise FidUnavailable(
        f"no Inception-v3 weights on this machine (no --inception-weights, no ${WEIGHTS_ENV}, "
        f"nothing at {cached}) and none may be downloaded; {HOW_TO_ENABLE}"
    )


class InceptionFeatures:
    """Pool3 features (N, 2048) of [0, 1] images with torchvision's ImageNet Inception-v3."""

    def __init__(self, weights: Path, device: torch.device) -> None:
        from torchvision.models import inception_v3

        # transform_input=True: the Google weights expect [-1, 1] inputs; torchvision converts
        # ImageNet-normalised ones to that, as its pretrained model does.
        model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            raise FidUnavailable(
                f"{weights} is not torchvision's inception_v3 state dict ({type(error).__name__}: "
                f"{str(error)[:200]}); {HOW_TO_ENABLE}"
            ) from error
        model.fc = torch.nn.Identity()  # the 2048-d average-pooled features, not the logits
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.weights = str(weights)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        features = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(self.device, torch.float32)
                batch = F.interpolate(batch, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear",
                                      align_corners=False)
                features.append(self.model((batch - self.mean) / self.std).double().cpu().numpy())
        return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), N >= 2 each:
    |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2).

    The matrix square roots come from symmetric eigendecompositions (eigenvalues clipped at 0),
    which stays real and stable when few samples make the covariances rank-deficient, as with
    MorphBench's 180 inputs in 2048 dimensions."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    mu_real, mu_fake = real.mean(axis=0), fake.mean(axis=0)
    cov_real = np.atleast_2d(np.cov(real, rowvar=False))
    cov_fake = np.atleast_2d(np.cov(fake, rowvar=False))
    root_real = _sqrt_psd(cov_real)
    cross = _sqrt_psd(root_real @ cov_fake @ root_real)
    value = float(np.sum((mu_real - mu_fake) ** 2) + np.trace(cov_real) + np.trace(cov_fake) - 2 * np.trace(cross))
    return max(value, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


class FidAccumulator:
    """Collects Inception features of input images (real) and frames (fake) per group (a
    MorphBench subset), so the frames never have to be kept; FID overall and per group."""

    def __init__(self, features: InceptionFeatures) -> None:
        self.features = features
        self.real: dict[str, list[np.ndarray]] = {}
        self.fake: dict[str, list[np.ndarray]] = {}

    def add(self, group: str, inputs: torch.Tensor, frames: torch.Tensor) -> None:
        self.real.setdefault(group, []).append(self.features(inputs))
        self.fake.setdefault(group, []).append(self.features(frames))

    def compute(self) -> dict[str, float | None]:
        """{"overall": FID, <group>: FID, ...}; None for a group with fewer than 2 samples."""
        result: dict[str, float | None] = {}
        groups = {"overall": list(self.real)} | {group: [group] for group in self.real}
        for name, members in groups.items():
            real = np.concatenate([f for g in members for f in self.real[g]])
            fake = np.concatenate([f for g in members for f in self.fake[g]])
            result[name] = frechet_distance(real, fake) if len(real) >= 2 and len(fake) >= 2 else None
        return result
