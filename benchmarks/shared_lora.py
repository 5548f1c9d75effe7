"""shared_lora against per-image LoRAs on the embedded model (issue 26): fit time, PPL, PDV and
endpoint PSNR, on fixed pairs of different shapes and on sets of one subject in several poses.

    .venv/bin/python -m benchmarks.shared_lora [--model DIR] [--pairs 0,1,2] [--seed 0] [--frames 17]

Protocol: the served options (MorphConfig defaults under the model's morph_defaults.json) with
QUALITY_OPTIONS' 17 frames per segment, 100 LoRA and 25 DDIM steps, as benchmarks/per_pair.py;
each set morphed once per image LoRAs and once with one shared LoRA, cold (no cache). PPL and
PDV are raw LPIPS-alex sums / variances over the whole sequence (a 3-image set: 33 frames);
endpoint PSNR is each input image against the frame that reproduces it (dB; the mean and the
worst are reported). Fit time is the pipeline's "lora" stage. Output: a markdown table on stdout
and JSON with every number (benchmarks/results/shared-lora-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from diffmorpher.config import MorphConfig
from diffmorpher.metrics import model_inputs, psnr, sequence_quality
from diffmorpher.perceptual import PerceptualDistance
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.dataset import centred_scene, render
from embedded_model.morph_pairs import QUALITY_OPTIONS, morph_pair
from export.build_mar import model_defaults

REPO_ROOT = Path(__file__).resolve().parent.parent

# One subject, several poses: (colour, shape, background) and per image (cx, cy, radius). The
# prompt is the same for every image (the caption names no position), as for photos of one
# person; the poses stay inside the training distribution (dataset.MIN/MAX_RADIUS_FRAC).
POSE_SETS: dict[str, tuple[tuple[str, str, str], list[tuple[float, float, float]]]] = {
    "red circle, moved and scaled": (("red", "circle", "white"),
                                     [(0.35, 0.40, 0.25), (0.5, 0.5, 0.34), (0.62, 0.58, 0.30)]),
    "green star, moved and scaled": (("green", "star", "black"),
                                     [(0.40, 0.60, 0.28), (0.58, 0.45, 0.36), (0.5, 0.5, 0.24)]),
}


def pose_set(name: str) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of pose set `name`."""
    (colour, shape, background), poses = POSE_SETS[name]
    base = centred_scene(colour, shape, background)
    images = [render(dataclasses.replace(base, cx=cx, cy=cy, radius=r)) for cx, cy, r in poses]
    return images, [base.caption] * len(images)


def measure(pipe: DiffMorpherPipeline, images: list[Image.Image], prompts: list[str], config: MorphConfig,
            metric: PerceptualDistance) -> dict[str, Any]:
    """One cold morph: fit and total time, PPL, PDV, and each input's endpoint PSNR."""
    started = time.perf_counter()
    result = pipe(images, prompts, config)
    wall = time.perf_counter() - started
    frames = result.frame_tensors.float()
    quality = sequence_quality(frames, metric)
    inputs = model_inputs(images, result.resolution)
    step = config.num_frames - 1
    endpoint = [psnr(frames[k * step], inputs[k]) for k in range(len(images))]
    return {"lora_fit_s": round(result.timings["lora"], 2), "total_s": round(wall, 2),
            "ppl": quality.ppl, "pdv": quality.pdv, "endpoint_psnr_db": endpoint,
            "endpoint_psnr_mean_db": sum(endpoint) / len(endpoint), "endpoint_psnr_min_db": min(endpoint),
            "work": result.work.to_dict()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| set | images | LoRA | fits | fit s | total s | PPL | PDV | endpoint PSNR mean / min dB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for mode in ("per_image", "shared"):
            m = row[mode]
            lines.append(f"| {row['set']} | {row['images']} | {mode.replace('_', '-')} | {m['work']['lora_fits']} "
                         f"| {m['lora_fit_s']:.1f} | {m['total_s']:.1f} | {m['ppl']:.3f} | {m['pdv']:.5f} "
                         f"| {m['endpoint_psnr_mean_db']:.2f} / {m['endpoint_psnr_min_db']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--pairs", default="0,1,2", help="fixed pairs (embedded_model/morph_pairs.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=QUALITY_OPTIONS["num_frames"],
                        help="frames per segment (17: the paper's sequences; fewer on a busy CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shared-lora-<time>.json)")
    args = parser.parse_args(argv)

    served = {**model_defaults(Path(args.model)), **QUALITY_OPTIONS, "seed": args.seed, "num_frames": args.frames}
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu")
    metric = pipe.perceptual_metric(MorphConfig(**served))
    out = Path(args.out) if args.out else (
        REPO_ROOT / "benchmarks" / "results" / time.strftime("shared-lora-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    pairs = [(f"pair {int(index)}", *morph_pair(int(index))) for index in args.pairs.split(",") if index]
    poses = [(name, *pose_set(name)) for name in POSE_SETS]
    sets = [item for both in zip(poses, pairs) for item in both] + poses[len(pairs):] + pairs[len(poses):]
    rows = []
    for name, images, prompts in sets:
        row: dict[str, Any] = {"set": name, "images": len(images), "prompts": prompts}
        for mode, shared in (("per_image", False), ("shared", True)):
            row[mode] = measure(pipe, images, prompts, MorphConfig(**served, shared_lora=shared), metric)
            print(f"{name} {mode}: {json.dumps(row[mode])}", flush=True)
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "options": served, "metric": metric.name,
                                   "device": "cpu", "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
