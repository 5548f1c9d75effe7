"""Issue 14's per-pair protocol: the full method against plain DDIM inversion + slerp, pair by
pair, on the ten fixed pairs (embedded_model/morph_pairs.py: the five of docs/quality.md and
the five chosen for this protocol before any morph of them was run) and LoRA seeds 0-3.

    .venv/bin/python -m benchmarks.per_pair [--model DIR] [--seeds 0,1,2,3]

Protocol, unchanged from docs/quality.md: 17 frames, QUALITY_OPTIONS' 100 LoRA / 25 DDIM
steps, LPIPS-alex PPL (sum of consecutive distances) and PDV (their variance): the "raw"
definition of diffmorpher/metrics.py, which the committed tables use; each row also has the
authors' definition (`ppl_authors`, `pdv_authors`: 512 px, n * sum, n^4 * variance;
docs/quality.md "The authors' PPL/PDV"), and the wins are counted under both. "Full" is what
the model's archive serves: MorphConfig's defaults under the folder's morph_defaults.json
(export.build_mar.model_defaults), with the LoRA seed set; "plain" is PLAIN_BASELINE_OPTIONS,
which fits no LoRA, so it is measured once per pair. Each morph also gets the hue-arc check of
embedded_model/hue_path.py against its input images' hues: how many in-between frames leave
the shorter hue arc between the ends (the demo pair's acceptance check, on every pair).

Output: a markdown table per seed on stdout and JSON with every number
(benchmarks/results/per-pair-<UTC time>.json, rewritten after each pair).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

from diffmorpher.config import PLAIN_BASELINE_OPTIONS, MorphConfig
from diffmorpher.metrics import authors_quality, sequence_quality
from diffmorpher.perceptual import PerceptualDistance
from diffmorpher.pipeline import DiffMorpherPipeline
from embedded_model.hue_path import morph_hue_path
from embedded_model.morph_pairs import ALL_PAIRS, QUALITY_OPTIONS, morph_pair
from export.build_mar import model_defaults


def measure(pipe: DiffMorpherPipeline, index: int, config: MorphConfig,
            metric: PerceptualDistance) -> dict[str, Any]:
    """One morph of fixed pair `index`: PPL, PDV and its hue path."""
    images, prompts = morph_pair(index)
    started = time.perf_counter()
    result = pipe(images, prompts, config)
    frames = result.frame_tensors.float()
    quality, authors = sequence_quality(frames, metric), authors_quality(frames, metric)
    hue_path = morph_hue_path(frames, images)
    return {"pair": index, "seed": config.seed, "ppl": quality.ppl, "pdv": quality.pdv,
            "ppl_authors": authors.ppl, "pdv_authors": authors.pdv,
            "off_arc_frames": hue_path.off_arc, "hue_path": hue_path.as_dict(),
            "alphas": [round(a, 4) for a in result.alphas],
            "wall_s": round(time.perf_counter() - started, 1)}


def wins(plain: dict[int, dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, int]:
    """How many pairs the full method beats plain on, per metric."""
    return {key: sum(r[key] < plain[r["pair"]][key] for r in full) for key in ("ppl", "pdv", "ppl_authors", "pdv_authors")}


def table(plain: dict[int, dict[str, Any]], full: list[dict[str, Any]], seed: int) -> str:
    mine = [r for r in full if r["seed"] == seed]
    won = wins(plain, mine)
    lines = [f"LoRA seed {seed}: full PPL < plain on {won['ppl']}/{len(mine)}, "
             f"PDV < plain on {won['pdv']}/{len(mine)} (authors' definition: PPL {won['ppl_authors']}/{len(mine)}, "
             f"PDV {won['pdv_authors']}/{len(mine)})", "",
             "| pair | plain PPL / PDV x1000 | full PPL / PDV x1000 | PPL | PDV | off-arc frames plain / full |",
             "|---|---|---|---|---|---|"]
    for r in mine:
        p = plain[r["pair"]]
        lines.append(f"| {r['pair']} | {p['ppl']:.3f} / {p['pdv'] * 1000:.2f} | {r['ppl']:.3f} / "
                     f"{r['pdv'] * 1000:.2f} | {'full' if r['ppl'] < p['ppl'] else 'plain'} | "
                     f"{'full' if r['pdv'] < p['pdv'] else 'plain'} | {p['off_arc_frames']} / "
                     f"{r['off_arc_frames']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--pairs", default=",".join(str(i) for i in range(len(ALL_PAIRS))))
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/per-pair-<time>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    served = {**model_defaults(Path(args.model)), **QUALITY_OPTIONS}
    pipe = DiffMorpherPipeline.from_pretrained(args.model, device="cpu")
    metric = pipe.perceptual_metric(MorphConfig(**served))
    out = Path(args.out) if args.out else (
        REPO_ROOT / "benchmarks" / "results" / time.strftime("per-pair-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    plain: dict[int, dict[str, Any]] = {}
    full: list[dict[str, Any]] = []
    for index in (int(i) for i in args.pairs.split(",")):
        plain[index] = measure(pipe, index, MorphConfig(**{**served, **PLAIN_BASELINE_OPTIONS}), metric)
        print(f"pair {index} plain: PPL {plain[index]['ppl']:.4f} PDV x1000 {plain[index]['pdv'] * 1000:.3f} "
              f"off-arc {plain[index]['off_arc_frames']} ({plain[index]['wall_s']} s)", flush=True)
        for seed in seeds:
            row = measure(pipe, index, MorphConfig(**{**served, "seed": seed}), metric)
            full.append(row)
            print(f"pair {index} full seed {seed}: PPL {row['ppl']:.4f} PDV x1000 {row['pdv'] * 1000:.3f} "
                  f"off-arc {row['off_arc_frames']} ({row['wall_s']} s)", flush=True)
        document = {"model": args.model, "options": served, "metric": metric.name,
                    "wins": {seed: wins(plain, [r for r in full if r["seed"] == seed]) for seed in seeds},
                    "plain": list(plain.values()), "full": full}
        out.write_text(json.dumps(document, indent=1))
    for seed in seeds:
        print("\n" + table(plain, full, seed))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
