"""Quality metrics of a morph sequence (paper Sec. 5): perceptual path length and variance.

PPL = sum of the perceptual distances between consecutive frames (lower = smoother path);
PDV = variance of those distances (lower = more even transition speed). Reported as raw LPIPS
sums/variances: the paper's printed magnitudes use an unstated scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .perceptual import PerceptualDistance, consecutive_distances
from .preprocess import image_to_tensor


@dataclass(frozen=True)
class SequenceQuality:
    ppl: float
    pdv: float
    metric: str
    distances: tuple[float, ...] = ()  # the consecutive distances PPL and PDV summarise

    def as_dict(self) -> dict[str, float | str]:
        return {"ppl": self.ppl, "pdv": self.pdv, "metric": self.metric}


def sequence_quality(frames: torch.Tensor, metric: PerceptualDistance) -> SequenceQuality:
    """PPL and PDV of (N, 3, H, W) frames in [0, 1]."""
    distances = consecutive_distances(frames, metric).double()
    return SequenceQuality(
        ppl=float(distances.sum()),
        pdv=float(distances.var(unbiased=False)),
        metric=metric.name,
        distances=tuple(distances.tolist()),
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float((a.cpu().double() - b.cpu().double()).square().mean())  # float64: on the CPU (MPS has none)
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def model_inputs(images: list, resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [0, 1]: the input images as the model saw them, to compare frames with."""
    return torch.cat([(image_to_tensor(image, resolution) + 1) / 2 for image in images])


def endpoint_psnr(frames: torch.Tensor, inputs: torch.Tensor) -> list[float]:
    """PSNR in dB of the first and last frame against the first and last input (fidelity)."""
    return [psnr(frames[0], inputs[0]), psnr(frames[-1], inputs[-1])]
