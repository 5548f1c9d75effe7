"""`make bench`: the same morphs in several modes, in one process and one run, with per-stage
times, their ratios, each mode's own peak memory (benchmarks/peak_memory.py) and the quality
metrics of each.

    python benchmarks/bench.py [--pairs 0] [--model models/tiny-shapes-sd] [--set key=value ...]

Modes (all on the same inputs, 16 frames + reschedule, the server's defaults otherwise):
- `baseline`: the algorithm as the paper's implementation runs it
  (config.PAPER_IMPLEMENTATION_OPTIONS): LoRAs fitted one after the other, endpoints and
  frames denoised one at a time (`frame_batch_size=1`), fp32, two full passes for the
  reschedule, no cache.
- `default_cold`: the service's path with an empty cache: LoRAs fitted together (no weight
  mix), endpoints and frames in shared batches (16 rows: one batch per pass), inference mode.
- `default_warm`: the same again on the now-filled cache (LoRAs, inverted latents and the
  rescheduled alphas are hits: no fitting, no inversion, no measuring pass).
- `fast`: the `fast` preset (config.FAST_PRESET_OPTIONS: 100 LoRA steps, 15 DDIM steps, attention
  interpolated for 0.8 of them),
  cold (no cache).

Ratios are measured within this one run (machines here are shared and noisy: compare ratios,
not absolute seconds across runs). Quality per mode: PPL and PDV (LPIPS-AlexNet, as
docs/quality.md) and the endpoints' reconstruction PSNR. Output: a table on stdout and JSON in
benchmarks/results/bench-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent

from benchmarks.peak_memory import PeakMemory
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.config import FAST_PRESET_OPTIONS, PAPER_IMPLEMENTATION_OPTIONS, MorphConfig
from diffmorpher.metrics import endpoint_psnr, model_inputs, sequence_quality
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.morph_pairs import morph_pair

STAGES = ("encode", "lora", "inversion", "frames", "reschedule", "total")
MODES = ("baseline", "default_cold", "default_warm", "fast")


def run_mode(pipe: DiffMorpherPipeline, mode: str, config: MorphConfig, cache: TensorCache,
             pair: int) -> dict:
    images, prompts = morph_pair(pair)
    mode_config = {"baseline": config.replace(**PAPER_IMPLEMENTATION_OPTIONS),
                   "fast": config.replace(**FAST_PRESET_OPTIONS)}.get(mode, config)
    pipe.cache = cache if mode.startswith("default") else None
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = pipe(images, prompts, mode_config)
        wall = time.perf_counter() - started
    quality = sequence_quality(result.frame_tensors, pipe.perceptual_metric(config.replace(perceptual_metric="lpips")))
    return {
        "mode": mode, "pair": pair, "wall_s": round(wall, 3),
        "stages_s": {stage: round(float(result.timings.get(stage, 0.0)), 3) for stage in STAGES},
        # This mode's own peak (the kernel's high-water mark reset at its start), and the RSS
        # it started from (the model, what earlier modes left with the allocator).
        "peak_rss_mib": round(memory.peak / 2**20, 1), "start_rss_mib": round(memory.start / 2**20, 1),
        "peak_rss_method": memory.method,
        "ppl": round(quality.ppl, 4), "pdv": round(quality.pdv, 6),
        "endpoint_psnr_db": [round(db, 2) for db in endpoint_psnr(result.frame_tensors, model_inputs(images, result.resolution))],
        "cache": result.cache, "schedule_cache": result.schedule_cache,
    }


def curve(pipe: DiffMorpherPipeline, config: MorphConfig, pairs: list[int]) -> list[dict]:
    """Speed and quality over DDIM steps x LoRA steps (the learning rate scaled so that steps x
    lr stays the paper's 200 x 2e-4), each a cold morph without a cache."""
    rows = []
    pipe.cache = None
    for lora_steps in (200, 100, 50):
        for ddim_steps in (50, 25, 15, 10):
            options = config.replace(lora_steps=lora_steps, lora_lr=2e-4 * 200 / lora_steps,
                                     num_inference_steps=ddim_steps)
            for pair in pairs:
                row = run_mode(pipe, "curve", options, None, pair)  # type: ignore[arg-type]
                row.update(lora_steps=lora_steps, num_inference_steps=ddim_steps)
                rows.append(row)
                print(f"curve lora {lora_steps} ddim {ddim_steps} pair {pair}: {row['wall_s']:.1f} s "
                      f"PPL {row['ppl']:.4f} PDV {row['pdv'] * 1000:.3f} PSNR {row['endpoint_psnr_db']}", flush=True)
    return rows


def summarise(runs: list[dict]) -> dict:
    """Per mode: mean wall time and quality over the pairs, and the ratios the issue tracks."""
    by_mode = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        by_mode[mode] = {
            "wall_s": sum(r["wall_s"] for r in rows) / len(rows),
            "ppl": sum(r["ppl"] for r in rows) / len(rows),
            "pdv": sum(r["pdv"] for r in rows) / len(rows),
            "endpoint_psnr_db": sum(sum(r["endpoint_psnr_db"]) / 2 for r in rows) / len(rows),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),  # over the pairs, each its own
            "added_rss_mib": round(max(r["peak_rss_mib"] - r["start_rss_mib"] for r in rows), 1),
        }
    base, cold, warm, fast = (by_mode[m] for m in MODES)
    return {
        "modes": by_mode,
        "ratios": {
            "baseline_over_default_cold": round(base["wall_s"] / cold["wall_s"], 2),
            "default_cold_over_warm": round(cold["wall_s"] / warm["wall_s"], 2),
            "baseline_over_fast": round(base["wall_s"] / fast["wall_s"], 2),
        },
        "quality_vs_baseline": {
            mode: {k: round(by_mode[mode][k] / base[k] - 1, 4) for k in ("ppl", "pdv", "endpoint_psnr_db")}
            for mode in MODES[1:]
        },
    }


def table(runs: list[dict], summary: dict) -> str:
    lines = ["| mode | pair | wall s | " + " | ".join(STAGES[:-1]) + " | peak RSS MiB (at start) | PPL | PDV x1000 | endpoint PSNR dB | cache |",
             "|---|---|---|" + "---|" * (len(STAGES) - 1) + "---|---|---|---|---|"]
    for r in runs:
        stages = " | ".join(f"{r['stages_s'][s]:.2f}" for s in STAGES[:-1])
        hits = ",".join(f"{c['lora']}/{c['latent']}" for c in r["cache"]) or "off"
        hits += f"; schedule {r.get('schedule_cache', 'off')}"
        lines.append(f"| {r['mode']} | {r['pair']} | {r['wall_s']:.2f} | {stages} | {r['peak_rss_mib']} ({r['start_rss_mib']}) | "
                     f"{r['ppl']:.4f} | {r['pdv'] * 1000:.3f} | {r['endpoint_psnr_db'][0]:.2f} / "
                     f"{r['endpoint_psnr_db'][1]:.2f} | {hits} |")
    ratios = summary["ratios"]
    lines += ["", f"baseline / default cold: **{ratios['baseline_over_default_cold']}x**; "
              f"default cold / warm: **{ratios['default_cold_over_warm']}x**; "
              f"baseline / fast: **{ratios['baseline_over_fast']}x**",
              "quality relative to baseline (fraction): " + json.dumps(summary["quality_vs_baseline"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--pairs", default="0", help="comma-separated fixed pairs (embedded_model/morph_pairs.py)")
    parser.add_argument("--set", action="append", default=[], help="MorphConfig option key=value")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--curve", action="store_true", help="also measure the DDIM x LoRA steps curve")
    parser.add_argument("--curve-only", action="store_true", help="only the curve (no modes, no ratios)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = MorphConfig.from_dict({"num_frames": 16, "use_reschedule": True, **overrides})
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu",
                                               lpips_weights=REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        cache = TensorCache(DiskStore(Path(cache_dir)))
        for pair in (int(p) for p in args.pairs.split(",")) if not args.curve_only else ():
            for mode in MODES:
                runs.append(run_mode(pipe, mode, config, cache, pair))
                print(f"{mode} pair {pair}: {runs[-1]['wall_s']:.1f} s", flush=True)
    summary = summarise(runs) if runs else {}
    wanted = args.curve or args.curve_only
    curve_rows = curve(pipe, config, [int(p) for p in args.pairs.split(",")]) if wanted else []
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": psutil.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": config.to_dict(), "runs": runs, "summary": summary, "curve": curve_rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("bench-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_text(json.dumps(report, indent=1))
    if runs:
        print(table(runs, summary))
    if curve_rows:
        print("\n| LoRA steps | DDIM steps | pair | wall s | PPL | PDV x1000 | endpoint PSNR dB |\n|---|---|---|---|---|---|---|")
        for row in curve_rows:
            print(f"| {row['lora_steps']} | {row['num_inference_steps']} | {row['pair']} | {row['wall_s']:.1f} | "
                  f"{row['ppl']:.4f} | {row['pdv'] * 1000:.3f} | {row['endpoint_psnr_db'][0]:.2f} / "
                  f"{row['endpoint_psnr_db'][1]:.2f} |")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
