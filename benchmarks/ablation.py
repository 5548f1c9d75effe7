"""Quality ablation of the method's parts on the fixed embedded-model pairs (paper Table 2 style).

For each pair the LoRAs are fitted once and shared by every variant, so the variants differ only
in the part being ablated. Prints PPL / PDV (raw LPIPS-alex sums / variances) per pair and
variant, and how many pairs each variant beats the plain baseline on; writes frame strips.

    PYTHONPATH=handler:. .venv/bin/python benchmarks/ablation.py [--frames 17] [--out out/ablation]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from diffmorpher import MorphConfig
from diffmorpher.metrics import sequence_quality
from diffmorpher.perceptual import consecutive_distances
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.morph_pairs import PAIRS, morph_pair

PLAIN = dict(use_lora=False, attn_lambda=0.0, use_adain=False, use_reschedule=False)
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


def strip(frames: torch.Tensor) -> Image.Image:
    row = torch.cat(list(frames), dim=2)  # (3, H, N*W)
    array = (row.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(array)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/tiny-shapes-sd")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lora-steps", type=int, default=100)
    parser.add_argument("--pairs", default=",".join(str(i) for i in range(len(PAIRS))))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra MorphConfig key=value for every variant")
    parser.add_argument("--out", default="out/ablation")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu")
    metric = pipe.perceptual_metric(MorphConfig())
    base = dict(num_frames=args.frames, num_inference_steps=args.steps, lora_steps=args.lora_steps, **extra)
    names = args.variants.split(",")
    rows = []
    for index in (int(i) for i in args.pairs.split(",")):
        images, prompts = morph_pair(index)
        loras = pipe(images, prompts, MorphConfig(**base).replace(num_frames=2, use_reschedule=False)).loras
        for name in names:
            config = MorphConfig(**{**base, **VARIANTS[name]})
            result = pipe(images, prompts, config, loras=loras if config.use_lora else None)
            quality = sequence_quality(result.frame_tensors, metric)
            steps = consecutive_distances(result.frame_tensors, metric).tolist()
            direct = float(metric(result.frame_tensors[:1], result.frame_tensors[-1:]).item())
            rows.append(dict(pair=index, variant=name, ppl=quality.ppl, pdv=quality.pdv, direct=direct,
                             steps=[round(s, 4) for s in steps], alphas=[round(a, 3) for a in result.alphas]))
            strip(result.frame_tensors).save(out / f"pair{index}_{name}.png")
            print(f"pair {index} {name:11s} PPL {quality.ppl:.4f} PDV {quality.pdv:.5f} "
                  f"ends {direct:.4f} steps {[round(s, 3) for s in steps]}", flush=True)
    print(f"\n{args.frames} frames, {args.steps} DDIM steps, {args.lora_steps} LoRA steps, extra {extra}")
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        plain = {r["pair"]: r for r in rows if r["variant"] == "plain"}
        ppl_wins = sum(r["ppl"] < plain[r["pair"]]["ppl"] for r in mine if r["pair"] in plain)
        pdv_wins = sum(r["pdv"] < plain[r["pair"]]["pdv"] for r in mine if r["pair"] in plain)
        mean_ppl = sum(r["ppl"] for r in mine) / len(mine)
        mean_pdv = sum(r["pdv"] for r in mine) / len(mine)
        print(f"{name:11s} mean PPL {mean_ppl:.4f} mean PDV {mean_pdv:.5f} "
              f"beats plain: PPL {ppl_wins}/{len(mine)} PDV {pdv_wins}/{len(mine)}")
    (out / "ablation.json").write_text(json.dumps(dict(base=base, rows=rows), indent=2))


if __name__ == "__main__":
    main()
