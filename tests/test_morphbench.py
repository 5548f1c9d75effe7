"""The MorphBench runner (benchmarks/morphbench.py) and its FID (benchmarks/fid.py), on a tiny
MorphBench-shaped folder drawn here with the embedded model's own scenes: the loader finds the
pairs in order and names what is wrong with a malformed folder; `make eval`'s entry point
morphs every pair on the embedded model (tiny settings) and reports real PPL/PDV/endpoint
numbers, and FID's absence with the reason (no Inception weights can be downloaded here); the
Frechet distance and the Inception feature path are checked with numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from benchmarks import morphbench
from benchmarks.fid import (
    WEIGHTS_ENV,
    FidUnavailable,
    InceptionFeatures,
    frechet_distance,
    resolve_inception_weights,
)
from benchmarks.morphbench import MorphBenchError, load_morphbench
from embedded_model.morph_pairs import scene_image
from tests.conftest import EMBEDDED_MODEL

# (subset, name, end 0, end 1): one metamorphosis (shape and colour change), one animation
# (same colour and background, the shape edited), as MorphBench's two kinds of pairs.
PAIRS = [
    ("Metamorphosis", "circle_triangle", ("red", "circle", "white"), ("blue", "triangle", "white")),
    ("Animation", "square_star", ("green", "square", "black"), ("green", "star", "black")),
]
TINY = ["--frames", "5", "--set", "lora_steps=8", "--set", "num_inference_steps=5"]
# Measured with TINY on these pairs: endpoint PSNR 22-25 dB (the 64 px VAE alone gives ~27 dB).
MIN_ENDPOINT_PSNR_DB = 18.0


def write_bench(root: Path, with_prompts: bool = True) -> Path:
    """A MorphBench-shaped folder: <subset>/<name>_0.png, <name>_1.png, and a prompts.json for
    the Metamorphosis pair only (the Animation pair falls back to the default prompt)."""
    for subset, name, end_0, end_1 in PAIRS:
        folder = root / subset
        folder.mkdir(parents=True, exist_ok=True)
        (image_0, prompt_0), (image_1, prompt_1) = scene_image(*end_0), scene_image(*end_1)
        image_0.save(folder / f"{name}_0.png")
        image_1.save(folder / f"{name}_1.png")
        if with_prompts and subset == "Metamorphosis":
            (folder / "prompts.json").write_text(json.dumps({name: [prompt_0, prompt_1]}))
    return root


def test_loader_finds_the_pairs_in_order_with_their_prompts(tmp_path: Path) -> None:
    root = write_bench(tmp_path / "bench")
    # More Animation pairs, named so that a plain string sort would put pair10 before pair2;
    # prompts.txt keys one end by stem and one by file name.
    extra = root / "Animation"
    image, _ = scene_image("red", "circle", "white")
    for name in ("pair10", "pair2"):
        image.save(extra / f"{name}_0.png")
        image.save(extra / f"{name}_1.jpg")
    (extra / "prompts.txt").write_text("# comment\npair2_1.jpg: a red circle\n\npair10: a circle\n")
    pairs = load_morphbench(root)
    assert [pair.id for pair in pairs] == [
        "Metamorphosis/circle_triangle", "Animation/pair2", "Animation/pair10", "Animation/square_star",
    ]
    assert pairs[0].prompts == ("a red circle on a white background", "a blue triangle on a white background")
    assert pairs[0].prompt_sources == ("prompts.json", "prompts.json")
    assert pairs[1].prompts == ("", "a red circle") and pairs[1].prompt_sources == ("default", "prompts.txt")
    assert pairs[2].prompts == ("a circle", "a circle")
    assert pairs[3].prompt_sources == ("default", "default")
    assert [path.name for path in pairs[1].paths] == ["pair2_0.png", "pair2_1.jpg"]
    assert pairs[0].images()[0].size == (64, 64)
    # One subset only, and a folder wrapped in one more directory (an unpacked zip).
    assert [p.id for p in load_morphbench(root, ["Animation"])][0] == "Animation/pair2"
    (tmp_path / "wrapper").mkdir()
    write_bench(tmp_path / "wrapper" / "MorphBench")
    assert len(load_morphbench(tmp_path / "wrapper")) == 2


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda root: (root / "Animation" / "square_star_1.png").unlink(), "square_star_0.png has no partner square_star_1"),
        (lambda root: [p.unlink() for p in (root / "Animation").iterdir()], "empty subset"),
        (lambda root: (root / "Animation" / "notes.png").write_bytes(b""), "must be named <name>_0 or <name>_1"),
        (lambda root: (root / "Animation" / "square_star_0.jpg").write_bytes(b""), "two images for square_star_0"),
        (lambda root: (root / "Animation" / "prompts.json").write_text('{"sqare_star": "typo"}'), "names no pair"),
        (lambda root: (root / "Animation" / "prompts.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda root: (root / "Animation" / "prompts.txt").write_text("no colon here\n"), "prompts.txt:1"),
        (lambda root: [(root / s).rename(root / f"{s}-old") for s in ("Animation", "Metamorphosis")], "has none of the MorphBench folders"),
    ],
)
def test_loader_names_what_is_malformed(tmp_path: Path, break_it, message: str) -> None:
    root = write_bench(tmp_path / "bench")
    break_it(root)
    with pytest.raises(MorphBenchError, match=message.replace("(", r"\(")):
        load_morphbench(root)


def test_missing_folder_is_a_clear_error_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert morphbench.main(["--bench", str(tmp_path / "nowhere")]) == 2
    assert "does not exist or is not a directory" in capsys.readouterr().err


def test_fewer_than_three_frames_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The authors' PPL/PDV skip sequences of 2 frames or fewer: `make eval` refuses them upfront."""
    assert morphbench.main(["--bench", str(write_bench(tmp_path / "bench")), "--frames", "2"]) == 2
    assert "--frames must be at least 3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model")
def test_eval_on_the_embedded_model_reports_metrics_and_why_fid_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights either
    out = tmp_path / "results"
    argv = ["--model", str(EMBEDDED_MODEL), "--bench", str(write_bench(tmp_path / "bench")), "--out", str(out), *TINY]
    assert morphbench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "FID will NOT be computed" in printed and "FID was not computed" in printed
    report = json.loads((out / "morphbench.json").read_text())
    assert report["fid"] is None
    assert "no Inception-v3 weights" in report["fid_reason"] and "--inception-weights" in report["fid_reason"]
    assert [(row["subset"], row["name"]) for row in report["pairs"]] == [(s, n) for s, n, _, _ in PAIRS]
    for row in report["pairs"]:
        print(row["name"], row["ppl"], row["pdv"], row["ppl_raw"], row["pdv_raw"], row["endpoint_psnr_db"], row["endpoint_lpips"])
        assert len(row["distances"]) == 4 and len(row["distances_raw"]) == 4 and len(row["alphas"]) == 5
        # The authors' definition (4 steps): PPL = 4 * sum, PDV = 4^4 * variance of the 512 px distances.
        steps = np.array(row["distances"])
        assert row["ppl"] == pytest.approx(4 * steps.sum(), rel=1e-3), row
        assert row["pdv"] == pytest.approx(4**4 * steps.var(), rel=1e-3, abs=1e-4), row
        assert row["ppl_raw"] == pytest.approx(sum(row["distances_raw"]), rel=1e-3), row
        assert 0.05 < row["ppl_raw"] < 4.0 and 0.0 <= row["pdv_raw"] < 0.5, row
        assert all(MIN_ENDPOINT_PSNR_DB < value < 60 for value in row["endpoint_psnr_db"]), row
        assert all(0.0 <= value < 0.4 for value in row["endpoint_lpips"]), row
    assert report["pairs"][1]["prompts"] == ["", ""]  # the Animation pair has no prompts file
    summary = report["summary"]
    assert summary["metric"] == "lpips-alex" and summary["definition"] == "authors"
    assert summary["overall"]["pairs"] == 2 and summary["Animation"]["pairs"] == 1
    assert summary["overall"]["ppl"] == pytest.approx(sum(r["ppl"] for r in report["pairs"]) / 2)
    assert summary["overall"]["pdv_raw"] == pytest.approx(sum(r["pdv_raw"] for r in report["pairs"]) / 2)
    table = (out / "morphbench.md").read_text()
    assert "| Metamorphosis/circle_triangle |" in table and "FID not computed: no Inception-v3 weights" in table


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 6))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, mean shifted by 0.5 in each of 6 dimensions: 6 * 0.25.
    assert frechet_distance(real, real + 0.5) == pytest.approx(1.5, rel=1e-9)
    fake = rng.normal(size=(150, 6)) * 2.0 + 1.0
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    reference = np.sum((mu_r - mu_f) ** 2) + np.trace(cov_r + cov_f - 2 * scipy.linalg.sqrtm(cov_r @ cov_f).real)
    assert frechet_distance(real, fake) == pytest.approx(reference, rel=1e-6)
    # Fewer samples than dimensions (MorphBench: 180 inputs, 2048 features): finite, >= 0.
    assert 0.0 <= frechet_distance(rng.normal(size=(5, 64)), rng.normal(size=(9, 64))) < np.inf


def test_inception_weights_lookup_and_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import inception_v3

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FidUnavailable, match="no Inception-v3 weights"):
        resolve_inception_weights()
    with pytest.raises(FidUnavailable, match="do not exist"):
        resolve_inception_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FidUnavailable, match=WEIGHTS_ENV):
        resolve_inception_weights()
    # A file that is not an Inception state dict is refused with the reason, not a traceback.
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(FidUnavailable, match="not torchvision's inception_v3 state dict"):
        InceptionFeatures(bad, torch.device("cpu"))
    # The real architecture with random weights (ImageNet's cannot be downloaded here): the
    # feature path users run, end to end.
    weights = tmp_path / "inception.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    features = InceptionFeatures(resolve_inception_weights(), torch.device("cpu"))
    images = torch.rand(3, 3, 64, 64)
    values = features(images)
    assert values.shape == (3, 2048) and np.isfinite(values).all()
    assert np.allclose(features(images[:1]), values[:1], atol=1e-4)  # batch-independent (eval mode)
