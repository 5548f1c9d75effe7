"""Quality ablation of the method's parts on the fixed embedded-model pairs (paper Table 2 style).

For each pair the LoRAs are fitted once and shared by every variant, so the variants differ only
in the part being ablated. Prints PPL / PDV (raw LPIPS-alex sums / variances) per pair and
variant, and how many pairs each variant beats the plain baseline on; writes frame strips.

With --text-path it also writes text_path.png: per pair, images sampled from one fixed noise
along the lerped text embedding alone (no inversion, LoRA or attention), which shows the path
the model's own text space takes between the two prompts.

    .venv/bin/python -m benchmarks.ablation [--frames 17] [--out out/ablation]
    .venv/bin/python -m benchmarks.ablation --table benchmarks/results/ablation-<date>.json

The second form runs nothing: it prints the Markdown table of a saved run, the one in
docs/quality.md ("Results"; tests/test_claims.py checks that the two agree).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from diffmorpher import MorphConfig
from diffmorpher.config import PLAIN_BASELINE_OPTIONS
from diffmorpher.ddim import ddim_sample
from diffmorpher.metrics import sequence_quality
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.morph_pairs import PAIRS, QUALITY_OPTIONS, morph_pair

PLAIN = PLAIN_BASELINE_OPTIONS  # short name for the table below
# Cumulative, as in the paper's ablation, then the full method without one part at a time.
VARIANTS: dict[str, dict] = {
    "plain": PLAIN,
    "+lora": dict(PLAIN, use_lora=True),
    "+attn": dict(PLAIN, use_lora=True, attn_lambda=0.6),
    "+adain": dict(PLAIN, use_lora=True, attn_lambda=0.6, use_adain=True),
    "full": {},
    "full-attn": dict(attn_lambda=0.0),
    "full-lora": dict(use_lora=False),
    "full-adain": dict(use_adain=False),
}


def to_image(picture: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL."""
    return Image.fromarray((picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def strip(frames: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) frames side by side: (3, H, N*W)."""
    return torch.cat(list(frames), dim=2)


def text_path(pipe: DiffMorpherPipeline, prompts: list[str], frames: int, steps: int) -> torch.Tensor:
    """Frames sampled from one seed-0 noise along the lerped text embedding of the two prompts."""
    models = pipe.models
    text = pipe.encode_prompts(prompts)
    conditioning = text.select([0]).lerp(text.select([1]), torch.linspace(0, 1, frames))
    side = models.native_resolution // models.vae_scale_factor
    shape = (1, models.unet.config.in_channels, side, side)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(models.device, models.dtype)

    def predict(latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        return models.unet(latents, timestep, **conditioning.unet_kwargs()).sample

    with torch.no_grad():
        return pipe.decode(ddim_sample(models.scheduler, predict, noise.repeat(frames, 1, 1, 1), steps))


def write_json(path: Path, run: dict, rows: list[dict]) -> None:
    """The run's settings and its rows so far (docs/quality.md's table is made from this file)."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    path.write_text(json.dumps(dict(run, variants={name: VARIANTS[name] for name in variants}, rows=rows), indent=2))


def table(report: dict) -> str:
    """The Markdown table of a run (ablation.json): per pair PPL / PDV x1000, the means over the
    pairs and on how many pairs each variant beats plain; the full method's row in bold."""
    rows = report["rows"]
    pairs = list(dict.fromkeys(row["pair"] for row in rows))
    plain = {row["pair"]: row for row in rows if row["variant"] == "plain"}
    lines = ["| variant | " + " | ".join(f"pair {pair}" for pair in pairs)
             + " | mean PPL | mean PDV×1000 | PPL < plain | PDV < plain |",
             "|---|" + "---|" * (len(pairs) + 4)]
    for name in dict.fromkeys(row["variant"] for row in rows):
        mine = {row["pair"]: row for row in rows if row["variant"] == name}
        cells = [f"{mine[pair]['ppl']:.3f} / {mine[pair]['pdv'] * 1000:.3f}" for pair in pairs]
        mean_ppl = sum(row["ppl"] for row in mine.values()) / len(mine)
        mean_pdv = sum(row["pdv"] for row in mine.values()) / len(mine) * 1000
        if name == "plain":
            wins = ["–", "–"]
        else:
            wins = [f"{sum(mine[pair][key] < plain[pair][key] for pair in pairs)}/{len(pairs)}" for key in ("ppl", "pdv")]
        totals = [f"{mean_ppl:.3f}", f"{mean_pdv:.3f}", *wins]
        label = name.replace("-", " − ") if name.startswith("full-") else name
        if name == "full":
            label, totals = "**full** (+reschedule)", [f"**{cell}**" for cell in totals]
        lines.append(f"| {label} | " + " | ".join(cells + totals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/tiny-shapes-sd")
    parser.add_argument("--frames", type=int, default=QUALITY_OPTIONS["num_frames"])
    parser.add_argument("--steps", type=int, default=QUALITY_OPTIONS["num_inference_steps"])
    parser.add_argument("--lora-steps", type=int, default=QUALITY_OPTIONS["lora_steps"])
    parser.add_argument("--pairs", default=",".join(str(i) for i in range(len(PAIRS))))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra MorphConfig key=value for every variant")
    parser.add_argument("--out", default="out/ablation")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--text-path", action="store_true", help="also write text_path.png (see above)")
    parser.add_argument("--table", type=Path, help="print the Markdown table of this saved run, run nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu")
    metric = pipe.perceptual_metric(MorphConfig())
    base = dict(num_frames=args.frames, num_inference_steps=args.steps, lora_steps=args.lora_steps, **extra)
    # The distance actually loaded ("lpips-alex", or "pixel-l2" without weights) and what ran.
    run = dict(model=args.model, metric=metric.name, threads=torch.get_num_threads(),
               started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), base=base)
    names = args.variants.split(",")
    rows = []
    paths = []
    for index in (int(i) for i in args.pairs.split(",")):
        images, prompts = morph_pair(index)
        if args.text_path:
            paths.append(strip(text_path(pipe, prompts, args.frames, args.steps)))
        loras = pipe(images, prompts, MorphConfig(**base).replace(num_frames=2, use_reschedule=False)).loras
        for name in names:
            config = MorphConfig(**{**base, **VARIANTS[name]})
            result = pipe(images, prompts, config, loras=loras if config.use_lora else None)
            quality = sequence_quality(result.frame_tensors, metric)
            steps = quality.distances
            direct = float(metric(result.frame_tensors[:1], result.frame_tensors[-1:]).item())
            rows.append(dict(pair=index, variant=name, ppl=quality.ppl, pdv=quality.pdv, direct=direct,
                             steps=[round(s, 4) for s in steps], alphas=[round(a, 3) for a in result.alphas]))
            to_image(strip(result.frame_tensors)).save(out / f"pair{index}_{name}.png")
            print(f"pair {index} {name:11s} PPL {quality.ppl:.4f} PDV {quality.pdv:.5f} "
                  f"ends {direct:.4f} steps {[round(s, 3) for s in steps]}", flush=True)
        # After each pair, so that a long run interrupted keeps the pairs it finished.
        write_json(out / "ablation.json", run, rows)
    print(f"\n{args.frames} frames, {args.steps} DDIM steps, {args.lora_steps} LoRA steps, extra {extra}")
    plain = {r["pair"]: r for r in rows if r["variant"] == "plain"}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        ppl_wins = sum(r["ppl"] < plain[r["pair"]]["ppl"] for r in mine if r["pair"] in plain)
        pdv_wins = sum(r["pdv"] < plain[r["pair"]]["pdv"] for r in mine if r["pair"] in plain)
        mean_ppl = sum(r["ppl"] for r in mine) / len(mine)
        mean_pdv = sum(r["pdv"] for r in mine) / len(mine)
        print(f"{name:11s} mean PPL {mean_ppl:.4f} mean PDV {mean_pdv:.5f} "
              f"beats plain: PPL {ppl_wins}/{len(mine)} PDV {pdv_wins}/{len(mine)}")
    if paths:
        to_image(torch.cat(paths, dim=1)).save(out / "text_path.png")
    write_json(out / "ablation.json", run, rows)


if __name__ == "__main__":
    main()
