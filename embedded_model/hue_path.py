"""Does a morph pass only through colours between its two ends? The demo's hue-arc check.

Issue 14's acceptance: on the demo pair (red circle -> blue triangle) every intermediate
frame's dominant colour lies on the shorter hue arc between the ends' colours, within 30
degrees. The previous embedded model, trained on pure scenes only, went red -> green -> blue
instead, because its VAE decoded the latents between red and blue as green (train_vae.py).

Hue is OKLCh hue (colour_space.py), the space the blend scenes are mixed in. A frame's
dominant hue: of its foreground pixels (evaluate.foreground_mask: far from the border's
colour) those with a visible chroma vote, weighted by chroma, into 10-degree bins; the winning
bin's pixels (within 20 degrees of its centre) give the circular mean. Why a mode and not a
mean over the whole foreground: a frame that is half red and half blue is not purple, and a
mean would call it purple and pass it.

    .venv/bin/python -m embedded_model.hue_path [--model DIR]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .colour_space import oklab_to_lch, rgb_to_oklab, signed_hue_difference
from .evaluate import foreground_mask

TOLERANCE_DEGREES = 30.0
MIN_CHROMA = 0.04  # OKLCh chroma below which a pixel is grey and has no hue to vote with
MIN_PIXELS = 20
BIN_DEGREES = 10.0
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_ENDS = ("red_circle.png", "blue_triangle.png")
# The Makefile's demo: DEMO_FRAMES and DEMO_OPTIONS.
DEMO_OPTIONS = {"num_frames": 16, "lora_steps": 100, "num_inference_steps": 25}


def dominant_hue(image: np.ndarray) -> float | None:
    """OKLCh hue in degrees of the dominant foreground colour of a uint8 (H, W, 3) image, or
    None when the foreground has too few coloured pixels (no shape, or a grey one)."""
    mask = foreground_mask(image)
    lch = oklab_to_lch(rgb_to_oklab(image[mask]))
    coloured = lch[lch[:, 1] >= MIN_CHROMA]
    if len(coloured) < MIN_PIXELS:
        return None
    chroma, hue = coloured[:, 1], coloured[:, 2]
    bins = np.floor(hue / BIN_DEGREES).astype(int) % int(360 / BIN_DEGREES)
    votes = np.bincount(bins, weights=chroma, minlength=int(360 / BIN_DEGREES))
    centre = (votes.argmax() + 0.5) * BIN_DEGREES
    near = np.abs(signed_hue_difference(centre, hue)) <= 2 * BIN_DEGREES
    angles = np.radians(hue[near])
    weights = chroma[near]
    mean = np.degrees(np.arctan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum()))
    return float(mean % 360.0)


def arc_distance(hue: float, hue_from: float, hue_to: float) -> float:
    """Degrees by which `hue` lies outside the shorter arc from hue_from to hue_to (0 on it)."""
    span = float(signed_hue_difference(hue_from, hue_to))
    offset = float(signed_hue_difference(hue_from, hue))
    low, high = min(0.0, span), max(0.0, span)
    if low <= offset <= high:
        return 0.0
    return min(abs(float(signed_hue_difference(hue, hue_from))),
               abs(float(signed_hue_difference(hue, hue_to))))


@dataclass(frozen=True)
class HuePath:
    """Per-frame dominant hues of a morph and their distances from the ends' shorter arc."""

    end_hues: tuple[float, float]
    hues: list[float | None]  # every frame, ends included
    distances: list[float | None]  # intermediate frames only; None where a frame has no hue
    tolerance: float

    @property
    def off_arc(self) -> int:
        """Intermediate frames off the arc by more than the tolerance, or with no hue at all."""
        return sum(d is None or d > self.tolerance for d in self.distances)

    @property
    def passed(self) -> bool:
        return self.off_arc == 0

    def as_dict(self) -> dict:
        rounded = lambda xs: [None if x is None else round(x, 1) for x in xs]  # noqa: E731
        return {"end_hues": [round(h, 1) for h in self.end_hues], "hues": rounded(self.hues),
                "distances": rounded(self.distances), "tolerance": self.tolerance,
                "passed": self.passed}


def check_hue_path(
    frames: list[np.ndarray], end_hues: tuple[float, float] | None = None,
    tolerance: float = TOLERANCE_DEGREES,
) -> HuePath:
    """Check uint8 frames (ends included); the ends' hues are the first and last frames' unless
    given (e.g. from the input images)."""
    hues = [dominant_hue(frame) for frame in frames]
    if end_hues is None:
        if hues[0] is None or hues[-1] is None:
            raise ValueError("an end frame has no dominant hue")
        end_hues = (hues[0], hues[-1])
    distances = [None if h is None else arc_distance(h, *end_hues) for h in hues[1:-1]]
    return HuePath(end_hues, hues, distances, tolerance)


def morph_hue_path(frame_tensors, images) -> HuePath:
    """The hue path of a morph's frames ((N, 3, H, W) tensor in [0, 1], ends included) against
    the hues of its two input images (PIL)."""
    frames = [(f.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for f in frame_tensors]
    ends = tuple(dominant_hue(np.asarray(image)) for image in images)
    return check_hue_path(frames, end_hues=ends)  # type: ignore[arg-type]


def demo_hue_path(model: str | Path, threads: int = 0) -> HuePath:
    """Morph the demo pair on `model` at the demo's options (over the folder's
    morph_defaults.json, as served) and check its hue path (the ends' hues from the demo input
    images)."""
    import torch
    from PIL import Image

    from diffmorpher import MorphConfig
    from diffmorpher.pipeline import DiffMorpherPipeline
    from export.build_mar import model_defaults

    if threads:
        torch.set_num_threads(threads)
    prompts = json.loads((DEMO_DIR / "prompts.json").read_text())
    images = [Image.open(DEMO_DIR / name).convert("RGB") for name in DEMO_ENDS]
    # The served archive applies the folder's morph_defaults.json beneath the request's options
    # (export/build_mar.py), so `make demo` runs with them too.
    options = {**model_defaults(Path(model)), **DEMO_OPTIONS}
    pipe = DiffMorpherPipeline.from_pretrained(str(model), device="cpu")
    result = pipe(images, [prompts[name] for name in DEMO_ENDS], MorphConfig(**options))
    return morph_hue_path(result.frame_tensors, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-shapes-sd")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(demo_hue_path(args.model, args.threads).as_dict()))


if __name__ == "__main__":
    main()
