"""How long must the reschedule's measuring pass be? PPL, PDV and time of the rescheduled
sequence per `reschedule_probe_fraction` (of the DDIM steps), on the fixed pairs, against the
paper's full second pass (1.0).

    .venv/bin/python -m benchmarks.reschedule_probe [--pairs 0,1,2,3,4]

Each pair's LoRAs and inverted latents are computed once (cache), so every row times the
measuring pass and the final pass only. Results and the choice of defaults: docs/quality.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

from benchmarks.bench import run_mode
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.config import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline

# Measuring passes, as MorphConfig options; the first is the paper's (a full second pass).
PROBES: tuple[dict[str, float], ...] = tuple(
    {"reschedule_probe_fraction": fraction} for fraction in (1.0, 0.5, 0.6, 0.7, 0.8)
)


def _name(probe: dict[str, float | int]) -> str:
    return ", ".join(f"{key.removeprefix('reschedule_probe_')} {value}" for key, value in probe.items())


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
    sums = {_name(probe): {"ppl": 0.0, "pdv": 0.0, "reschedule_s": 0.0} for probe in PROBES}
    print("| pair | measuring pass | reschedule s | PPL | PDV x1000 |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="probe-cache-") as cache_dir:
        cache = TensorCache(DiskStore(Path(cache_dir)))
        for pair in (int(p) for p in args.pairs.split(",")):
            for probe in PROBES:
                row = run_mode(pipe, "default_warm", config.replace(**probe), cache, pair)
                for key, value in (("ppl", row["ppl"]), ("pdv", row["pdv"]), ("reschedule_s", row["stages_s"]["reschedule"])):
                    sums[_name(probe)][key] += value
                print(f"| {pair} | {_name(probe)} | {row['stages_s']['reschedule']:.2f} | {row['ppl']:.4f} | "
                      f"{row['pdv'] * 1000:.3f} |", flush=True)
    full = sums[_name(PROBES[0])]
    print("\n| measuring pass | reschedule s (sum) | PPL sum vs full | PDV sum vs full |\n|---|---|---|---|")
    for name, total in sums.items():
        print(f"| {name} | {total['reschedule_s']:.1f} | {total['ppl'] / full['ppl'] - 1:+.1%} | "
              f"{total['pdv'] / full['pdv'] - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
