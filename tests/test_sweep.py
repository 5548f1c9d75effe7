"""benchmarks/sweep.py: the summary's means over pairs on made-up rows of known mean and spread;
then, tiny, two settings (lambda 0 and 1, reschedule on) on fixed pair 0 with few steps. One LoRA fit serves both; the endpoints are the same whatever lambda is (they store
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

NEEDS_EMBEDDED_MODEL = pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model")


def row(pair: int, attn_lambda: float, ppl: float, pdv: float, psnr: tuple[float, float], sharp: float) -> dict:
    return {"pair": pair, "attn_lambda": attn_lambda, "use_reschedule": True, "ppl": ppl, "pdv": pdv,
            "endpoint_psnr_db": list(psnr), "sharpness_ratio": sharp}


def test_summary_averages_each_setting_over_its_pairs() -> None:
    """Three pairs of two settings, in sweep order (pair by pair, settings within): each
    setting's means are over its own three rows only, whose values are spread (mean of 1, 2, 6
    is 3, not any one of them, nor the other setting's 30), and the endpoint PSNR is averaged
    over both endpoints first."""
    rows = []
    for pair, (ppl, pdv, psnr, sharp) in enumerate([(1.0, 0.001, (20.0, 22.0), 0.9),
                                                    (2.0, 0.004, (24.0, 26.0), 0.8),
                                                    (6.0, 0.010, (28.0, 30.0), 0.4)]):
        rows.append(row(pair, 0.0, ppl, pdv, psnr, sharp))
        rows.append(row(pair, 1.0, 10 * ppl, 10 * pdv, (psnr[0] - 10, psnr[1] - 10), sharp / 2))
    none, full = summarise(rows)
    assert (none["attn_lambda"], full["attn_lambda"]) == (0.0, 1.0)
    assert none["pairs"] == full["pairs"] == [0, 1, 2]
    assert none["mean_ppl"] == pytest.approx(3.0) and full["mean_ppl"] == pytest.approx(30.0)
    assert none["mean_pdv"] == pytest.approx(0.005) and full["mean_pdv"] == pytest.approx(0.05)
    assert none["mean_endpoint_psnr_db"] == pytest.approx(25.0) and full["mean_endpoint_psnr_db"] == pytest.approx(15.0)
    assert none["mean_sharpness_ratio"] == pytest.approx(0.7) and full["mean_sharpness_ratio"] == pytest.approx(0.35)
    assert none["ppl_per_pair"] == [1.0, 2.0, 6.0] and full["pdv_per_pair"] == pytest.approx([0.01, 0.04, 0.1])
    lines = table([none, full]).splitlines()
    assert lines[2].startswith("| 0.0 | on | 3.0000 | 5.000 | 25.00 | 0.700 | 1.000 / 1.00 | 2.000 / 4.00 | 6.000 / 10.00 |")
    assert lines[3].startswith("| 1.0 | on | 30.0000 | 50.000 | 15.00 | 0.350 |")


@pytest.mark.slow
@NEEDS_EMBEDDED_MODEL
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
    assert summary[1]["pairs"] == [0]  # the means over several pairs: test_summary_averages_each_setting_over_its_pairs
    assert "| 1.0 | on |" in table(summary)
    plot(summary, tmp_path / "sweep.png")
    assert Image.open(tmp_path / "sweep.png").size[0] > 500
