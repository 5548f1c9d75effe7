"""benchmarks/sweep.py, tiny: two settings (lambda 0 and 1, reschedule on) on fixed pair 0 with
few steps. One LoRA fit serves both; the endpoints are the same whatever lambda is (they store
attention, never replace it), and full attention interpolation blurs the frames in between,
which the sharpness ratio shows; the table and the plot are written."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from benchmarks.sweep import plot, summarise, sweep_pair, table
from diffmorpher.config import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model"),
]


def test_two_settings_on_one_pair(tmp_path: Path) -> None:
    pipe = DiffMorpherPipeline.from_pretrained(
        EMBEDDED_MODEL, device="cpu", lpips_weights=REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
    )
    base = MorphConfig(num_frames=5, num_inference_steps=5, lora_steps=5)
    lines: list[str] = []
    rows = sweep_pair(pipe, 0, base, [(0.0, True), (1.0, True)], pipe.perceptual_metric(base), log=lines.append)
    assert len(rows) == 2 and len(lines) == 2
    none, full = rows
    assert none["endpoint_psnr_db"] == pytest.approx(full["endpoint_psnr_db"], abs=0.01)
    assert none["endpoint_psnr_db"][0] > 18.0
    assert all(row["ppl"] > 0.1 and 0 < row["sharpness_ratio"] < 1.5 for row in rows), rows
    # Measured: 0.93 (lambda 0) and 0.77 (lambda 1).
    assert full["sharpness_ratio"] < none["sharpness_ratio"] - 0.05, rows
    summary = summarise(rows)
    assert [s["attn_lambda"] for s in summary] == [0.0, 1.0]
    assert summary[1]["mean_ppl"] == pytest.approx(full["ppl"])
    assert "| 1.0 | on |" in table(summary)
    plot(summary, tmp_path / "sweep.png")
    assert Image.open(tmp_path / "sweep.png").size[0] > 500
