"""Quality metrics of a morph sequence (paper Sec. 5): perceptual path length and variance.

Two named definitions of PPL and PDV over the distances d_k between consecutive frames
(lower = smoother path / more even transition speed), both kept because results differ by them:

- "raw" (`sequence_quality`): PPL = sum(d_k), PDV = population variance of d_k, with d_k taken
  on the frames as they are (the model's resolution). The committed tables of bench.py,
  ablation.py, sweep.py and per_pair.py use it (docs/quality.md).
- "authors" (`authors_quality`, what `make eval` reports): the authors' evaluation (their
  issue #33 and the paper's printed magnitudes). Each frame is the 8-bit PNG a sequence is saved
  as, resized to 512x512 (PIL bilinear) and scaled to [-1, 1] for LPIPS v0.1 AlexNet; with
  n = N - 1 steps (eps = 1/n), PPL = mean(d_k / eps^2) = n * sum(d_k) and
  PDV = population variance of d_k / eps^2 = n^4 * var(d_k). Sequences of fewer than 3 frames
  are not measured (the authors skip them). docs/quality.md, "The authors' PPL/PDV", says which
  part is the issue's code and which is inferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .perceptual import PerceptualDistance, consecutive_distances
from .preprocess import image_to_tensor, pil_to_unit_tensor, tensor_to_images

RAW = "raw"
AUTHORS = "authors"
AUTHORS_RESOLUTION = 512  # the side every frame is resized to before LPIPS (issue #33)
AUTHORS_MIN_FRAMES = 3  # shorter sequences are skipped by the authors' evaluation


@dataclass(frozen=True)
class SequenceQuality:
    ppl: float
    pdv: float
    metric: str
    distances: tuple[float, ...] = ()  # the consecutive distances PPL and PDV summarise (unscaled)
    definition: str = RAW  # RAW or AUTHORS: which PPL/PDV these are (see the module docstring)

    def as_dict(self) -> dict[str, float | str]:
        return {"ppl": self.ppl, "pdv": self.pdv, "metric": self.metric, "definition": self.definition}


def sequence_quality(frames: torch.Tensor, metric: PerceptualDistance) -> SequenceQuality:
    """The "raw" PPL and PDV of (N, 3, H, W) frames in [0, 1]: sum and population variance of
    the consecutive distances at the frames' own resolution."""
    distances = consecutive_distances(frames, metric).double()
    return SequenceQuality(
        ppl=float(distances.sum()),
        pdv=float(distances.var(unbiased=False)),
        metric=metric.name,
        distances=tuple(distances.tolist()),
    )


def authors_frames(frames: torch.Tensor, resolution: int = AUTHORS_RESOLUTION) -> torch.Tensor:
    """(N, 3, R, R) in [0, 1]: the frames as the authors' evaluation reads them, i.e. the 8-bit
    PNGs a sequence is saved as, resized to R x R with PIL's bilinear filter (what torchvision's
    Resize does to a PIL image). LpipsDistance then scales [0, 1] to [-1, 1], as their
    Normalize(0.5, 0.5) does."""
    images = tensor_to_images(frames)
    return pil_to_unit_tensor([image.resize((resolution, resolution), Image.BILINEAR) for image in images])


def scale_authors(distances: torch.Tensor) -> tuple[float, float]:
    """(PPL, PDV) of the authors from unscaled consecutive distances: with n steps (eps = 1/n),
    PPL = mean(d / eps^2) = n * sum(d), PDV = population variance of d / eps^2."""
    steps = distances.numel()
    scaled = distances.double() * steps**2
    return float(scaled.mean()), float(scaled.var(unbiased=False))


def authors_quality(
    frames: torch.Tensor, metric: PerceptualDistance, resolution: int = AUTHORS_RESOLUTION
) -> SequenceQuality:
    """The authors' PPL and PDV of (N, 3, H, W) frames in [0, 1] (N >= 3; module docstring).
    `distances` holds the unscaled LPIPS of each step at `resolution`."""
    if frames.shape[0] < AUTHORS_MIN_FRAMES:
        raise ValueError(
            f"the authors' PPL/PDV need at least {AUTHORS_MIN_FRAMES} frames (they skip shorter "
            f"sequences), got {frames.shape[0]}"
        )
    distances = consecutive_distances(authors_frames(frames, resolution), metric).double()
    ppl, pdv = scale_authors(distances)
    return SequenceQuality(
        ppl=ppl, pdv=pdv, metric=metric.name, distances=tuple(distances.tolist()), definition=AUTHORS
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
