"""The authors' PPL/PDV (diffmorpher.metrics.authors_quality, what `make eval` reports) against
values known by hand: frames whose pixel distances are exact, a stub distance that returns
chosen per-step values and records what it was given, and one real LPIPS-alex sequence computed
a second way, the way the authors' evaluation reads a sequence (PNG files, torchvision's
Resize/ToTensor/Normalize, the lpips model on [-1, 1]), with the scaling written out here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from diffmorpher import perceptual
from diffmorpher.metrics import (
    AUTHORS,
    AUTHORS_RESOLUTION,
    RAW,
    authors_frames,
    authors_quality,
    sequence_quality,
)
from diffmorpher.perceptual import LpipsDistance, PixelDistance
from diffmorpher.preprocess import pil_to_unit_tensor

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "lpips-reference"
CPU = torch.device("cpu")


def flat_frames(levels: list[int], side: int = 8) -> torch.Tensor:
    """(N, 3, side, side) frames in [0, 1], frame k filled with levels[k] / 255 (exact in 8 bits)."""
    return torch.stack([torch.full((3, side, side), level / 255.0) for level in levels])


class StubDistance:
    """Returns the next of `values` for each pair and records the frames it was given."""

    name = "stub"
    weights = "none"
    identity = "stub"

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.seen: list[torch.Tensor] = []

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.seen += [a, b]
        taken, self.values = self.values[: a.shape[0]], self.values[a.shape[0] :]
        return torch.tensor(taken, dtype=torch.float32)


def test_known_pixel_distances_give_the_authors_and_the_raw_numbers() -> None:
    # Steps of 10, 20, 30, 40 levels: RMS pixel distances d = [10, 20, 30, 40] / 255 at any size.
    frames = flat_frames([0, 10, 30, 60, 100])
    authors = authors_quality(frames, PixelDistance())
    raw = sequence_quality(frames, PixelDistance())
    steps = 4  # eps = 1/4
    assert authors.distances == pytest.approx([10 / 255, 20 / 255, 30 / 255, 40 / 255], abs=1e-6)
    # PPL = mean(d / eps^2) = n * sum(d); PDV = population variance of d / eps^2 = n^4 * var(d).
    assert authors.ppl == pytest.approx(steps * 100 / 255, rel=1e-6)  # 1.5686
    assert authors.pdv == pytest.approx(steps**4 * 125 / 255**2, rel=1e-6)  # 0.49212
    assert raw.ppl == pytest.approx(100 / 255, rel=1e-6) and raw.pdv == pytest.approx(125 / 255**2, rel=1e-6)
    assert (authors.definition, raw.definition) == (AUTHORS, RAW)
    assert authors.as_dict()["definition"] == "authors"


def test_stub_distances_are_scaled_by_the_step_count_and_see_512px_unit_frames() -> None:
    frames = torch.rand(5, 3, 16, 24)
    even = StubDistance([0.1, 0.1, 0.1, 0.1])
    quality = authors_quality(frames, even)
    assert quality.ppl == pytest.approx(1.6) and quality.pdv == pytest.approx(0.0, abs=1e-12)
    seen = torch.cat(even.seen)
    # Squashed to a square, as Resize((512, 512)) does.
    assert seen.shape[1:] == (3, AUTHORS_RESOLUTION, AUTHORS_RESOLUTION)
    assert 0.0 <= float(seen.min()) and float(seen.max()) <= 1.0  # LpipsDistance maps [0, 1] to [-1, 1]
    # Same path length, uneven speed: variance of [0.05, 0.15, 0.05, 0.15] * 16 = 0.8^2 = 0.64.
    uneven = authors_quality(frames, StubDistance([0.05, 0.15, 0.05, 0.15]))
    assert uneven.ppl == pytest.approx(1.6) and uneven.pdv == pytest.approx(0.64)
    # The paper's scale: 16 steps of LPIPS 21.10 / 256 give its DiffMorpher PPL of 21.10.
    paper = authors_quality(torch.rand(17, 3, 8, 8), StubDistance([21.10 / 256] * 16))
    assert paper.ppl == pytest.approx(21.10) and paper.pdv == pytest.approx(0.0, abs=1e-9)


def test_authors_frames_are_the_8bit_pngs_resized_with_pil() -> None:
    frames = torch.rand(2, 3, 20, 30)
    resized = authors_frames(frames, resolution=40)
    assert resized.shape == (2, 3, 40, 40)
    png = Image.fromarray((frames[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = transforms.ToTensor()(transforms.Resize((40, 40))(png))
    assert torch.equal(resized[1], expected)


def test_fewer_than_three_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 frames"):
        authors_quality(flat_frames([0, 10]), PixelDistance())


def test_real_lpips_sequence_matches_the_authors_reading_of_png_files(tmp_path: Path) -> None:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"LPIPS reference images not available at {REFERENCE_DIR}")
    path = perceptual.resolve_weights_path()
    if path is None or not path.is_file():
        pytest.skip("LPIPS weights are not prepared (python -m export.lpips_weights prepare)")
    metric = LpipsDistance.from_file(path, CPU)
    names = ["ex_ref", "ex_p1", "ex_p0", "ex_ref"]  # 64x64 patches: a 4-frame "sequence"
    frames = pil_to_unit_tensor([Image.open(REFERENCE_DIR / f"{name}.png") for name in names])
    ours = authors_quality(frames, metric)

    # The second way: the sequence as PNG files, read and prepared as the authors' evaluation does.
    prepare = transforms.Compose(
        [transforms.Resize((512, 512)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    for index, name in enumerate(names):
        Image.open(REFERENCE_DIR / f"{name}.png").convert("RGB").save(tmp_path / f"{index:03d}.png")
    files = sorted(tmp_path.glob("*.png"))
    images = [prepare(Image.open(file).convert("RGB")).unsqueeze(0) for file in files]
    with torch.no_grad():
        steps = np.array([float(metric.model(images[k], images[k + 1])) for k in range(len(images) - 1)])
    n = len(steps)
    assert ours.distances == pytest.approx(steps.tolist(), abs=1e-5)
    assert ours.ppl == pytest.approx(float(np.mean(steps * n**2)), rel=1e-5)
    assert ours.pdv == pytest.approx(float(np.var(steps * n**2)), rel=1e-5)
    # The numbers themselves (measured 2026-12-03, CPU): at the patches' own 64 px the steps are
    # the LPIPS authors' published pair values (ref/p1 0.1376, p0/ref 0.7219); the authors' 512 px
    # resize changes them, so the same frames give other per-step distances than at 64 px.
    raw = sequence_quality(frames, metric)
    assert raw.distances == pytest.approx([0.1376, 0.7197, 0.7219], abs=1e-3)
    assert ours.distances == pytest.approx([0.4300, 0.6196, 0.5567], abs=1e-3)
    assert ours.ppl == pytest.approx(4.819, abs=5e-3) and ours.pdv == pytest.approx(0.503, abs=5e-3)
