"""DiffMorpherPipeline: the paper's algorithm as numbered stages (work in progress: API fixed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .config import MorphConfig
from .models import MorphModels
from .results import MorphResult, ProgressCallback


class DiffMorpherPipeline:
    """Morph K >= 2 images into K-1 segments of frames.

    Usage::

        pipe = DiffMorpherPipeline.from_pretrained("models/tiny-shapes-sd", device=None)
        result = pipe([img_a, img_b], ["a red circle", "a blue triangle"], MorphConfig(num_frames=8),
                      progress=callback)
        result.frames  # list of PIL images
    """

    def __init__(self, models: MorphModels, perceptual=None) -> None:
        self.models = models
        self.perceptual = perceptual

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        lpips_weights: str | Path | None = None,
    ) -> "DiffMorpherPipeline":
        raise NotImplementedError

    def __call__(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        config: MorphConfig | None = None,
        *,
        loras: Sequence[dict[str, torch.Tensor] | None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> MorphResult:
        raise NotImplementedError
