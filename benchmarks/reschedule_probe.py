"""How long must the reschedule's measuring pass be? PPL, PDV and time of the rescheduled
sequence per `reschedule_probe_fraction`, on the fixed pairs, against the full pass (1.0).

    PYTHONPATH=handler:. .venv/bin/python benchmarks/reschedule_probe.py [--pairs 0,1,2,3,4]

Each pair's LoRAs and inverted latents are computed once (cache), so every row times the
measuring pass and the final pass only. Results and the choice of defaults: docs/quality.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "handler"), str(REPO_ROOT)]

from benchmarks.bench import run_mode  # noqa: E402
from diffmorpher.cache import DiskStore, TensorCache  # noqa: E402
from diffmorpher.config import MorphConfig  # noqa: E402
from diffmorpher.pipeline import DiffMorpherPipeline  # noqa: E402

FRACTIONS = (1.0, 0.5, 0.3, 0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--pairs", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DiffMorpherPipeline.from_pretrained(
        args.model, device="cpu", lpips_weights=REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
    )
    config = MorphConfig(num_frames=16, use_reschedule=True)
    sums = {fraction: {"ppl": 0.0, "pdv": 0.0, "reschedule_s": 0.0} for fraction in FRACTIONS}
    print("| pair | probe fraction | reschedule s | PPL | PDV x1000 |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="probe-cache-") as cache_dir:
        cache = TensorCache(DiskStore(Path(cache_dir)))
        for pair in (int(p) for p in args.pairs.split(",")):
            for fraction in FRACTIONS:
                row = run_mode(pipe, "default_warm", config.replace(reschedule_probe_fraction=fraction), cache, pair)
                for key, value in (("ppl", row["ppl"]), ("pdv", row["pdv"]), ("reschedule_s", row["stages_s"]["reschedule"])):
                    sums[fraction][key] += value
                print(f"| {pair} | {fraction} | {row['stages_s']['reschedule']:.2f} | {row['ppl']:.4f} | "
                      f"{row['pdv'] * 1000:.3f} |", flush=True)
    full = sums[1.0]
    print("\n| probe fraction | reschedule s (sum) | PPL sum vs full | PDV sum vs full |\n|---|---|---|---|")
    for fraction, total in sums.items():
        print(f"| {fraction} | {total['reschedule_s']:.1f} | {total['ppl'] / full['ppl'] - 1:+.1%} | "
              f"{total['pdv'] / full['pdv'] - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
