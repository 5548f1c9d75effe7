"""The quality part of `make bench`, on fixed pair 0 at the server's defaults (16 frames,
reschedule): the service's path (batched LoRA fits and frames, cold and warm cache) gives the
baseline's PPL, PDV and endpoint PSNR within 5 %, and the `fast` preset is no more than 10 %
worse on any of them. Speed is `make bench`'s job (ratios in one run), not a test's."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks.bench import MODES, run_mode, summarise
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.config import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model"),
]


def test_default_path_keeps_the_baselines_quality_and_fast_stays_within_10_percent() -> None:
    pipe = DiffMorpherPipeline.from_pretrained(
        EMBEDDED_MODEL, device="cpu", lpips_weights=REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
    )
    config = MorphConfig(num_frames=16, use_reschedule=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = TensorCache(DiskStore(Path(cache_dir)))
        runs = [run_mode(pipe, mode, config, cache, pair=0) for mode in MODES]
    relative = summarise(runs)["quality_vs_baseline"]
    print(f"\nquality relative to baseline: {relative}")
    for mode in ("default_cold", "default_warm"):
        assert all(abs(change) <= 0.05 for change in relative[mode].values()), (mode, relative[mode])
    fast = relative["fast"]
    assert fast["ppl"] <= 0.10 and fast["pdv"] <= 0.10, fast  # lower is smoother / more even
    assert fast["endpoint_psnr_db"] >= -0.10, fast
