"""A real-size architecture through the whole served path (make sized-e2e ARCH=sd15).

SD 1.5's published architecture with random weights: 2.1 GB of float16 weights, an 860M-parameter
UNet at 512 px. Export, TorchServe + guard, one morph through the gateway with the project's
client; the numbers must be those of a real-size model, not of the embedded one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints.architectures import ARCHITECTURES
from benchmarks.sized_e2e import OPTIONS, run

pytestmark = pytest.mark.slow

UNET_FP32_BYTES = 859_520_964 * 4  # SD 1.5's UNet parameters in float32, as the CPU worker holds them


def test_sd15_sized_model_is_served_at_its_native_resolution(tmp_path: Path) -> None:
    sized = run("sd15", tmp_path / "out", model_dir=tmp_path / "sd15")
    assert (sized.resolution, sized.frames) == (ARCHITECTURES["sd15"].resolution, OPTIONS["num_frames"]) == (512, 3)
    assert 2.0e9 < sized.model_bytes < 2.3e9  # UNet + VAE + CLIP ViT-L in float16
    assert sized.archive_bytes < 50e6  # external weights: the archive holds code and config only
    assert sized.worker_peak_rss_bytes > UNET_FP32_BYTES  # the worker really loaded the real size
    assert {"encode", "lora", "inversion", "frames", "reschedule"} <= set(sized.stages_s)
    assert sized.lora_step_s > sized.unet_forward_s > 0  # backward on top of a forward, batch 2
    assert sized.morph_s >= sized.stages_s["total"]
