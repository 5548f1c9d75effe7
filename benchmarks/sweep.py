"""The fidelity/smoothness trade-off of attention interpolation, measured: a sweep of
`attn_lambda` x the reschedule on the fixed embedded-model pairs, with the protocol of
docs/quality.md (17 frames, QUALITY_OPTIONS' LoRA and DDIM steps, LPIPS-alex PPL/PDV in the raw
definition, diffmorpher/metrics.py).

    .venv/bin/python -m benchmarks.sweep [--pairs 0,1,2,3,4] \
        [--lambdas 0,0.2,0.4,0.6,0.8,1.0] [--reschedule on,off] [--plot docs/quality-sweep.png]

Each pair's LoRAs are fitted once (seed 0) and reused by every setting, as ablation.py does:
the settings then differ only in lambda and the reschedule, and the sweep costs one LoRA fit
per pair instead of one per setting.

Per setting and pair: PPL and PDV (smoothness), the endpoints' PSNR against the inputs
(fidelity as the issue defines it) and the intermediate frames' sharpness relative to the end
frames (Laplacian variance of frames 1..N-2 over that of frames 0 and N-1). The last is here
because the endpoint PSNR cannot see what lambda does: the endpoints are denoised storing
attention, never replacing it, and the reschedule keeps alphas 0 and 1, so their PSNR is the
same for every setting. What the paper reports for lambda > 0.6 is blur of the frames in
between, which the sharpness ratio measures (1.0: as sharp as the ends).

Output: the per-setting table on stdout (markdown), JSON with every pair's numbers
(benchmarks/results/sweep-<UTC time>.json, written after each pair), and the plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent

from diffmorpher.config import MorphConfig
from diffmorpher.metrics import endpoint_psnr, model_inputs, sequence_quality
from diffmorpher.perceptual import PerceptualDistance
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.morph_pairs import PAIRS, QUALITY_OPTIONS, morph_pair

LAMBDAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def setting_name(attn_lambda: float, reschedule: bool) -> str:
    return f"lambda {attn_lambda:.1f}, reschedule {'on' if reschedule else 'off'}"


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """(N,) variance of the Laplacian of each (N, 3, H, W) [0, 1] image's luminance: falls as
    an image blurs."""
    grey = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return F.conv2d(grey, LAPLACIAN).flatten(1).var(dim=1)


def measure(pipe: DiffMorpherPipeline, index: int, config: MorphConfig,
            loras: list[dict[str, torch.Tensor] | None], metric: PerceptualDistance) -> dict[str, Any]:
    """One morph of fixed pair `index` with the given LoRAs, and its numbers."""
    images, prompts = morph_pair(index)
    started = time.perf_counter()
    result = pipe(images, prompts, config, loras=loras)
    frames = result.frame_tensors.float()
    quality = sequence_quality(frames, metric)
    ends = sharpness(torch.stack([frames[0], frames[-1]])).mean()
    return {
        "pair": index, "attn_lambda": config.attn_lambda, "use_reschedule": config.use_reschedule,
        "ppl": quality.ppl, "pdv": quality.pdv,
        "endpoint_psnr_db": endpoint_psnr(frames, model_inputs(images, result.resolution)),
        "sharpness_ratio": float(sharpness(frames[1:-1]).mean() / ends),
        "distances": [round(d, 5) for d in quality.distances],
        "alphas": [round(a, 4) for a in result.alphas],
        "wall_s": round(time.perf_counter() - started, 2),
    }


def sweep_pair(pipe: DiffMorpherPipeline, index: int, base: MorphConfig, settings: list[tuple[float, bool]],
               metric: PerceptualDistance, log: Any = None) -> list[dict[str, Any]]:
    """Every setting on one pair, its LoRAs fitted once (a 2-frame morph without reschedule)."""
    log = log or (lambda line: print(line, flush=True))
    images, prompts = morph_pair(index)
    loras = pipe(images, prompts, base.replace(num_frames=2, use_reschedule=False)).loras
    rows = []
    for attn_lambda, reschedule in settings:
        row = measure(pipe, index, base.replace(attn_lambda=attn_lambda, use_reschedule=reschedule), loras, metric)
        rows.append(row)
        log(f"pair {index} {setting_name(attn_lambda, reschedule)}: PPL {row['ppl']:.4f} PDV x1000 "
            f"{row['pdv'] * 1000:.3f} endpoint PSNR {row['endpoint_psnr_db'][0]:.2f}/{row['endpoint_psnr_db'][1]:.2f} "
            f"sharpness {row['sharpness_ratio']:.3f} ({row['wall_s']:.1f} s)")
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting, in sweep order: means over the pairs, and the per-pair PPL/PDV."""
    keys = list(dict.fromkeys((r["attn_lambda"], r["use_reschedule"]) for r in rows))
    summary = []
    for attn_lambda, reschedule in keys:
        mine = [r for r in rows if (r["attn_lambda"], r["use_reschedule"]) == (attn_lambda, reschedule)]
        count = len(mine)
        summary.append({
            "attn_lambda": attn_lambda, "use_reschedule": reschedule, "pairs": [r["pair"] for r in mine],
            "mean_ppl": sum(r["ppl"] for r in mine) / count,
            "mean_pdv": sum(r["pdv"] for r in mine) / count,
            "mean_endpoint_psnr_db": sum(sum(r["endpoint_psnr_db"]) / 2 for r in mine) / count,
            "mean_sharpness_ratio": sum(r["sharpness_ratio"] for r in mine) / count,
            "pdv_per_pair": [r["pdv"] for r in mine], "ppl_per_pair": [r["ppl"] for r in mine],
        })
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    pairs = summary[0]["pairs"] if summary else []
    lines = ["| lambda | reschedule | mean PPL | mean PDV x1000 | mean endpoint PSNR dB | intermediate sharpness | "
             + " | ".join(f"pair {p} PPL / PDV x1000" for p in pairs) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(pairs)]
    for s in summary:
        cells = " | ".join(f"{ppl:.3f} / {pdv * 1000:.2f}" for ppl, pdv in zip(s["ppl_per_pair"], s["pdv_per_pair"]))
        lines.append(f"| {s['attn_lambda']:.1f} | {'on' if s['use_reschedule'] else 'off'} | {s['mean_ppl']:.4f} | "
                     f"{s['mean_pdv'] * 1000:.3f} | {s['mean_endpoint_psnr_db']:.2f} | "
                     f"{s['mean_sharpness_ratio']:.3f} | {cells} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Four panels over lambda, one line per reschedule setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_ppl", "mean PPL (lower: smoother)", 1.0), ("mean_pdv", "mean PDV x1000 (lower: more even)", 1000.0),
              ("mean_endpoint_psnr_db", "mean endpoint PSNR dB (fidelity)", 1.0),
              ("mean_sharpness_ratio", "intermediate sharpness / ends'", 1.0)]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for axis, (key, title, scale) in zip(axes, panels):
        for reschedule, style in ((True, "o-"), (False, "s--")):
            points = [s for s in summary if s["use_reschedule"] == reschedule]
            if points:
                axis.plot([s["attn_lambda"] for s in points], [s[key] * scale for s in points], style,
                          label=f"reschedule {'on' if reschedule else 'off'}")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("attn_lambda")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    pairs = summary[0]["pairs"] if summary else []
    figure.suptitle(f"attention interpolation sweep, embedded model, fixed pairs {pairs} (17 frames, 100 LoRA / 25 DDIM steps)",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--pairs", default=",".join(str(i) for i in range(len(PAIRS))))
    parser.add_argument("--lambdas", default=",".join(f"{x:.1f}" for x in LAMBDAS))
    parser.add_argument("--reschedule", default="on,off", help="on, off or on,off")
    parser.add_argument("--frames", type=int, default=QUALITY_OPTIONS["num_frames"])
    parser.add_argument("--steps", type=int, default=QUALITY_OPTIONS["num_inference_steps"])
    parser.add_argument("--lora-steps", type=int, default=QUALITY_OPTIONS["lora_steps"])
    parser.add_argument("--set", action="append", default=[], help="extra MorphConfig key=value for every setting (e.g. seed=1)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sweep-<time>.json)")
    parser.add_argument("--plot", default=None, help="PNG path of the plot (none by default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [(float(x), r == "on") for r in args.reschedule.split(",") for x in args.lambdas.split(",")]
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = MorphConfig(num_frames=args.frames, num_inference_steps=args.steps, lora_steps=args.lora_steps, **extra)
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu")
    metric = pipe.perceptual_metric(base)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / time.strftime("sweep-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for index in (int(i) for i in args.pairs.split(",")):
        rows += sweep_pair(pipe, index, base, settings, metric)
        document = {"base": base.to_dict(), "metric": metric.name, "torch_threads": torch.get_num_threads(),
                    "summary": summarise(rows), "rows": rows}
        out.write_text(json.dumps(document, indent=1))
    summary = summarise(rows)
    print(table(summary))
    if args.plot:
        plot(summary, Path(args.plot))
        print(f"plot: {args.plot}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
