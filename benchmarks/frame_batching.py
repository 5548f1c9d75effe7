"""Benchmark: intermediate frames batched (frame_batch_size=N) vs one at a time (=1).

Runs the same morph (given LoRAs, so fitting is excluded) alternately with each batch size and
prints per-stage medians and the ratio, measured in one process so machine drift cancels.

    .venv/bin/python -m benchmarks.frame_batching [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from diffmorpher import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/tiny-shapes-sd")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device=args.device)
    images = [Image.open("assets/demo/red_circle.png"), Image.open("assets/demo/blue_triangle.png")]
    prompts = ["a red circle on a white background", "a blue triangle on a white background"]
    base = MorphConfig(num_frames=args.frames, num_inference_steps=args.steps, lora_steps=20)
    loras = pipe(images, prompts, base.replace(num_frames=2, use_reschedule=False)).loras
    totals: dict[int, list[float]] = {1: [], args.batch: []}
    frames: dict[int, torch.Tensor] = {}
    for _ in range(args.repeats):
        for batch in totals:
            started = time.perf_counter()
            result = pipe(images, prompts, base.replace(frame_batch_size=batch), loras=loras)
            totals[batch].append(time.perf_counter() - started)
            frames[batch] = result.frame_tensors
    one, many = statistics.median(totals[1]), statistics.median(totals[args.batch])
    print(f"device {pipe.models.device}, torch threads {torch.get_num_threads()}, "
          f"{args.frames} frames x {args.steps} steps, reschedule on, repeats {args.repeats}")
    print(f"frame_batch_size=1: median {one:.2f} s  {[round(t, 2) for t in totals[1]]}")
    print(f"frame_batch_size={args.batch}: median {many:.2f} s  {[round(t, 2) for t in totals[args.batch]]}")
    print(f"speed-up (batch 1 / batch {args.batch}): {one / many:.2f}x")
    print(f"max abs frame difference: {(frames[1] - frames[args.batch]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
