"""Data passed out of the morph pipeline: progress events while it runs, the result at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

# Stage names, in pipeline order. Servers forward them to clients verbatim.
STAGE_ENDPOINTS = "endpoints"  # one image, K prompts: making the K-1 other endpoints; step = denoising step
STAGE_LORA = "lora"  # fitting one LoRA per image (or one shared: item 0); step = optimisation step
STAGE_INVERSION = "inversion"  # DDIM inversion per image; step = denoising step
STAGE_FRAMES = "frames"  # generating frames (first pass); step = frames done
STAGE_RESCHEDULE = "reschedule"  # second pass at re-spaced alphas; step = frames done
STAGE_FRAME_READY = "frame"  # a final output frame is ready (event carries the image)
STAGES = (STAGE_ENDPOINTS, STAGE_LORA, STAGE_INVERSION, STAGE_FRAMES, STAGE_RESCHEDULE, STAGE_FRAME_READY)


@dataclass
class ProgressEvent:
    """One progress report. `frame` is set when a final output frame is ready (frames arrive in
    order, index `frame_index` of `num_frames`); otherwise it is a step of `stage`."""

    stage: str
    step: int
    total: int
    item: int = 0  # which image (lora/inversion) or segment the step belongs to
    frame: Image.Image | None = None
    frame_index: int | None = None
    num_frames: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class WorkDone:
    """What a morph computed itself rather than read from a cache or was given. A deterministic
    recompute gives the same frames as a cache hit, so only these counts show that a cache
    saved the work (tests of the cache compare them, not its own hit/miss labels)."""

    lora_fits: int = 0  # LoRAs this morph fitted: one per image, or one shared by all (shared_lora)
    lora_steps: int = 0  # LoRA optimizer steps run, per LoRA (2 images fitted for 40 steps: 80; shared: 40)
    inversions: int = 0  # images this morph DDIM-inverted

    def to_dict(self) -> dict[str, int]:
        return {"lora_fits": self.lora_fits, "lora_steps": self.lora_steps, "inversions": self.inversions}


@dataclass
class MorphResult:
    """Frames of the whole morph (all segments concatenated, joints once) and what produced them."""

    frames: list[Image.Image]
    frame_tensors: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], before 8-bit quantisation
    alphas: list[float]  # per frame: the alpha within its segment
    segments: list[int]  # per frame: index of the segment (0 .. K-2) it belongs to
    loras: list[dict[str, torch.Tensor] | None]  # per input image; safetensors-compatible
    latents: list[torch.Tensor]  # per input image: the DDIM-inverted noise latent (cpu)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    perceptual_metric: str = "none"  # distance that drove the reschedule: "lpips-alex", "pixel-l2" or "none"
    perceptual_weights: str = ""  # where the metric's weights came from
    seed: int = 0
    resolution: int = 0
    cache: list[dict[str, str | None]] = field(default_factory=list)  # per input image (CacheKeys.report)
    schedule_cache: str = "off"  # the rescheduled alphas: "hit" (no measuring pass), "miss" or "off"
    # What "auto" settled on for this morph: the worker's device and dtype, and the rows per UNet
    # call chosen from the free device memory (frame_batch_size 0), before any out-of-memory split.
    device: str = ""
    dtype: str = ""
    frame_batch_size: int = 0
    work: WorkDone = field(default_factory=WorkDone)  # LoRA fits and inversions this morph ran
    # One image and K prompts: the K-1 endpoints the service made (for prompts 1..K-1), and per
    # endpoint whether it came from the cache: "hit", "miss" (made now) or "off" (no cache).
    generated: list[Image.Image] = field(default_factory=list)
    endpoint_cache: list[str] = field(default_factory=list)
