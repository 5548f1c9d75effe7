"""`make eval`: the paper's benchmark, MorphBench, with any SD 1.x/2.x diffusers folder.

    .venv/bin/python -m benchmarks.morphbench --model <sd folder> --bench <MorphBench folder> \
        [--device cuda --dtype float16|bfloat16] [--frames 17] [--set key=value ...] [--limit N] \
        [--inception-weights PATH] [--save-frames] [--out DIR]

Per pair and overall (and per subset): PPL and PDV of a 17-frame sequence by the authors'
definition (diffmorpher/metrics.py `authors_quality`: frames as 8-bit PNGs resized to 512 px,
LPIPS-alex, PPL = n * sum, PDV = n^4 * variance of the n steps' distances; docs/quality.md, "The
authors' PPL/PDV") and by this project's "raw" one (`ppl_raw`, `pdv_raw`: sum / variance at the
model's resolution, as bench.py and ablation.py report), the endpoints' PSNR and LPIPS against
the inputs, and FID between
the input images and all generated frames where Inception weights are on the machine (benchmarks/
fid.py); where they are not, the run says so at its start and end and the JSON records
`"fid": null` with the reason. Output: <out>/morphbench.json and <out>/morphbench.md (default
benchmarks/results/morphbench-<UTC time>/).

Why here and not in a package: benchmarks/ already holds the scripts that measure the core
(bench.py, ablation.py) and import it the same way; this is one more of them, never served, so
it needs no package of its own. The loader (`load_morphbench`) and the runner (`evaluate`) are
separate functions so the test can check each.

MorphBench's layout (downloaded from the authors' Google Drive or Baidu link in their README):
two folders, `Metamorphosis/` (66 pairs) and `Animation/` (24), each holding `<name>_0.<ext>`
and `<name>_1.<ext>` (png, jpg, jpeg or webp). Folder names are matched case-insensitively, and
a folder holding one directory that holds them (as an unpacked zip often does) is accepted.
The authors publish no prompts for MorphBench (the paper does not list them and the release
holds only images; third-party evaluations write their own). So each subset folder may carry a
prompts file, and every end without one gets `--default-prompt` (default: the empty prompt),
which the JSON records per end (`prompt_source`):
- `prompts.json`: an object whose keys are a pair's `<name>` (value: one prompt for both ends,
  or a list of two) or one end's file stem or file name (`<name>_0`, `<name>_0.png`; value: its
  prompt);
- or `prompts.txt`: one `<key>: <prompt>` per line with the same keys (blank lines and lines
  starting with `#` are ignored).
A key that names no pair is an error (a typo would otherwise leave a pair on the empty prompt).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

from benchmarks.fid import FidAccumulator, FidUnavailable, InceptionFeatures, resolve_inception_weights
from diffmorpher.config import ConfigError, MorphConfig
from diffmorpher.metrics import AUTHORS, AUTHORS_MIN_FRAMES, authors_quality, endpoint_psnr, model_inputs, sequence_quality
from diffmorpher.perceptual import PerceptualDistance
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.preprocess import tensor_to_images

SUBSETS: tuple[str, ...] = ("Metamorphosis", "Animation")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
PROMPT_FILES: tuple[str, ...] = ("prompts.json", "prompts.txt")
PAPER_FRAMES = 17  # the sequence length of the paper's PPL/PDV
END_PATTERN = re.compile(r"^(?P<name>.+)_(?P<end>[01])$")


class MorphBenchError(ValueError):
    """The benchmark folder is not MorphBench-shaped; the message names the file or folder."""


@dataclass(frozen=True)
class BenchPair:
    """One MorphBench pair: its two images and prompts, and where each prompt came from."""

    subset: str
    name: str
    paths: tuple[Path, Path]
    prompts: tuple[str, str]
    prompt_sources: tuple[str, str]  # a prompts file's name, or "default"

    @property
    def id(self) -> str:
        return f"{self.subset}/{self.name}"

    def images(self) -> list[Image.Image]:
        images = []
        for path in self.paths:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        return images


def natural_key(text: str) -> list[Any]:
    """Sort key that puts "pair2" before "pair10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------- loader
def find_subsets(root: Path, wanted: Iterable[str] = SUBSETS) -> dict[str, Path]:
    """{subset: folder} for the wanted subsets present under `root` (names case-insensitive; one
    wrapping directory, as an unpacked zip has, is looked through)."""
    if not root.is_dir():
        raise MorphBenchError(f"MorphBench folder {root} does not exist or is not a directory")
    wanted = list(wanted)

    def present(folder: Path) -> dict[str, Path]:
        children = {child.name.lower(): child for child in folder.iterdir() if child.is_dir()}
        return {subset: children[subset.lower()] for subset in wanted if subset.lower() in children}

    found = present(root)
    if not found:
        directories = [child for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")]
        if len(directories) == 1:
            found = present(directories[0])
    if not found:
        listing = sorted(child.name for child in root.iterdir())[:10]
        raise MorphBenchError(
            f"{root} has none of the MorphBench folders {wanted} (it holds {listing}); expected "
            f"{'/, '.join(wanted)}/ with <name>_0.png and <name>_1.png in each"
        )
    return found


def read_prompts(folder: Path) -> tuple[dict[str, Any], str | None]:
    """The prompts file of a subset folder as {key: value}, and its file name (None: no file)."""
    files = [folder / name for name in PROMPT_FILES if (folder / name).is_file()]
    if len(files) > 1:
        raise MorphBenchError(f"{folder} has both {' and '.join(f.name for f in files)}: keep one")
    if not files:
        return {}, None
    path = files[0]
    if path.suffix == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MorphBenchError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(entries, dict):
            raise MorphBenchError(f"{path} must hold a JSON object of key -> prompt, got {type(entries).__name__}")
        return entries, path.name
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, prompt = line.partition(":")
        if not colon or not key.strip():
            raise MorphBenchError(f"{path}:{number}: expected '<key>: <prompt>', got {line[:80]!r}")
        entries[key.strip()] = prompt.strip()
    return entries, path.name


def _prompt_table(entries: dict[str, Any], names: list[str], source: str, folder: Path) -> dict[tuple[str, int], str]:
    """{(name, end): prompt} from a prompts file's entries; unknown keys and bad values are errors."""
    table: dict[tuple[str, int], str] = {}
    for key, value in entries.items():
        stem = key
        for suffix in IMAGE_SUFFIXES:
            if key.lower().endswith(suffix):
                stem = key[: -len(suffix)]
        match = END_PATTERN.match(stem)
        if key in names:
            if isinstance(value, str):
                table[(key, 0)] = table[(key, 1)] = value
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                table[(key, 0)], table[(key, 1)] = value
            else:
                raise MorphBenchError(f"{folder / source}: {key!r} needs a prompt or a list of two, got {value!r:.80}")
        elif match and match["name"] in names:
            if not isinstance(value, str):
                raise MorphBenchError(f"{folder / source}: {key!r} needs a prompt string, got {value!r:.80}")
            table[(match["name"], int(match["end"]))] = value
        else:
            raise MorphBenchError(
                f"{folder / source}: key {key!r} names no pair of {folder.name}/ (keys are <name>, "
                f"<name>_0 or <name>_1; pairs: {names[:5]}{'...' if len(names) > 5 else ''})"
            )
    return table


def load_subset(folder: Path, subset: str, default_prompt: str = "") -> list[BenchPair]:
    """The pairs of one subset folder, in natural name order."""
    ends: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        match = END_PATTERN.match(path.stem)
        if not match:
            raise MorphBenchError(f"{path}: a MorphBench image must be named <name>_0 or <name>_1 ({'/'.join(IMAGE_SUFFIXES)})")
        name, end = match["name"], int(match["end"])
        if end in ends.setdefault(name, {}):
            raise MorphBenchError(f"{folder}: two images for {name}_{end}: {ends[name][end].name} and {path.name}")
        ends[name][end] = path
    if not ends:
        raise MorphBenchError(f"{folder} holds no <name>_0/<name>_1 images ({'/'.join(IMAGE_SUFFIXES)}): empty subset")
    for name, found in ends.items():
        if set(found) != {0, 1}:
            have, missing = next(iter(found.values())), 1 - next(iter(found))
            raise MorphBenchError(f"{folder}: {have.name} has no partner {name}_{missing} ({'/'.join(IMAGE_SUFFIXES)})")
    names = sorted(ends, key=natural_key)
    entries, source = read_prompts(folder)
    table = _prompt_table(entries, names, source, folder) if source else {}
    pairs = []
    for name in names:
        prompts = tuple(table.get((name, end), default_prompt) for end in (0, 1))
        sources = tuple(source if (name, end) in table else "default" for end in (0, 1))
        pairs.append(BenchPair(subset, name, (ends[name][0], ends[name][1]), prompts, sources))  # type: ignore[arg-type]
    return pairs


def load_morphbench(root: str | Path, subsets: Iterable[str] = SUBSETS, default_prompt: str = "") -> list[BenchPair]:
    """Every pair of the MorphBench folder `root`: subsets in the order given, pairs in natural
    name order. Raises MorphBenchError naming what is malformed."""
    found = find_subsets(Path(root), subsets)
    return [pair for subset, folder in found.items() for pair in load_subset(folder, subset, default_prompt)]


# ---------------------------------------------------------------------- runner
@dataclass
class EvalReport:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    fid: dict[str, float | None] | None = None
    fid_reason: str | None = None
    fid_weights: str | None = None


def evaluate_pair(pipe: DiffMorpherPipeline, pair: BenchPair, config: MorphConfig,
                  metric: PerceptualDistance) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One morph and its metrics; also the inputs and frames as (N, 3, H, W) [0, 1] tensors."""
    images = pair.images()
    started = time.perf_counter()
    result = pipe(images, list(pair.prompts), config)
    wall = time.perf_counter() - started
    frames = result.frame_tensors.float()
    inputs = model_inputs(images, result.resolution)
    quality, raw = authors_quality(frames, metric), sequence_quality(frames, metric)
    ends = torch.stack([frames[0], frames[-1]])
    row = {
        "subset": pair.subset, "name": pair.name, "images": [path.name for path in pair.paths],
        "prompts": list(pair.prompts), "prompt_source": list(pair.prompt_sources),
        "ppl": quality.ppl, "pdv": quality.pdv, "distances": [round(d, 5) for d in quality.distances],
        "ppl_raw": raw.ppl, "pdv_raw": raw.pdv, "distances_raw": [round(d, 5) for d in raw.distances],
        "endpoint_psnr_db": endpoint_psnr(frames, inputs),
        "endpoint_lpips": [float(d) for d in metric(ends, inputs)],
        "alphas": [round(a, 4) for a in result.alphas], "wall_s": round(wall, 2),
        "timings_s": {stage: round(float(seconds), 2) for stage, seconds in result.timings.items()},
    }
    return row, inputs, frames


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [sum(r[key]) / len(r[key]) if isinstance(r[key], list) else r[key] for r in rows]
    return sum(values) / len(values)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over all pairs and per subset (endpoint metrics: the mean of both ends)."""
    groups = {"overall": rows} | {s: [r for r in rows if r["subset"] == s] for s in dict.fromkeys(r["subset"] for r in rows)}
    return {
        name: {"pairs": len(members), **{key: _mean(members, key) for key in ("ppl", "pdv", "ppl_raw", "pdv_raw", "endpoint_psnr_db", "endpoint_lpips")}}
        for name, members in groups.items()
    }


def evaluate(pipe: DiffMorpherPipeline, pairs: list[BenchPair], config: MorphConfig,
             inception: InceptionFeatures | None, log: Any = print, frames_dir: Path | None = None) -> EvalReport:
    """Morph every pair with `config`; PPL/PDV/endpoint metrics per pair, FID over all of them
    when `inception` is given."""
    metric = pipe.perceptual_metric(config.replace(perceptual_metric="lpips"))
    fid = FidAccumulator(inception) if inception is not None else None
    report = EvalReport()
    for index, pair in enumerate(pairs, start=1):
        row, inputs, frames = evaluate_pair(pipe, pair, config, metric)
        report.pairs.append(row)
        if fid is not None:
            fid.add(pair.subset, inputs, frames)
        if frames_dir is not None:
            (frames_dir / pair.subset).mkdir(parents=True, exist_ok=True)
            strip = tensor_to_images(torch.cat(list(frames), dim=2).unsqueeze(0))[0]
            strip.save(frames_dir / pair.subset / f"{pair.name}.png")
        log(f"[{index}/{len(pairs)}] {pair.id}: PPL {row['ppl']:.3f} PDV {row['pdv']:.3f} (raw {row['ppl_raw']:.4f} / "
            f"{row['pdv_raw']:.6f}) "
            f"endpoint PSNR {row['endpoint_psnr_db'][0]:.2f}/{row['endpoint_psnr_db'][1]:.2f} dB "
            f"LPIPS {row['endpoint_lpips'][0]:.4f}/{row['endpoint_lpips'][1]:.4f} ({row['wall_s']:.1f} s)")
    report.summary = summarise(report.pairs)
    report.summary["metric"] = metric.name
    report.summary["definition"] = AUTHORS  # of "ppl"/"pdv"; "ppl_raw"/"pdv_raw" are the raw definition
    if fid is not None:
        report.fid = fid.compute()
    return report


def markdown(report: EvalReport, header: str) -> str:
    """The per-pair and summary tables."""
    lines = [f"# MorphBench evaluation\n\n{header}\n",
             "| pair | PPL | PDV | raw PPL | raw PDV x1000 | endpoint PSNR dB (0 / 1) | endpoint LPIPS (0 / 1) | prompts |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.pairs:
        lines.append(f"| {r['subset']}/{r['name']} | {r['ppl']:.3f} | {r['pdv']:.3f} | {r['ppl_raw']:.4f} | {r['pdv_raw'] * 1000:.3f} | "
                     f"{r['endpoint_psnr_db'][0]:.2f} / {r['endpoint_psnr_db'][1]:.2f} | "
                     f"{r['endpoint_lpips'][0]:.4f} / {r['endpoint_lpips'][1]:.4f} | {'/'.join(sorted(set(r['prompt_source'])))} |")
    lines += ["", "| group | pairs | mean PPL | mean PDV | mean raw PPL | mean raw PDV x1000 | mean endpoint PSNR dB | mean endpoint LPIPS | FID |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, values in report.summary.items():
        if not isinstance(values, dict):
            continue
        fid = report.fid.get(name) if report.fid else None
        lines.append(f"| {name} | {values['pairs']} | {values['ppl']:.3f} | {values['pdv']:.3f} | "
                     f"{values['ppl_raw']:.4f} | {values['pdv_raw'] * 1000:.3f} | "
                     f"{values['endpoint_psnr_db']:.2f} | {values['endpoint_lpips']:.4f} | "
                     f"{'n/a' if fid is None else f'{fid:.2f}'} |")
    if report.fid is None:
        lines += ["", f"FID not computed: {report.fid_reason}"]
    return "\n".join(lines) + "\n"


def load_inception(path: str | None, device: torch.device, log: Any = print) -> tuple[InceptionFeatures | None, str | None]:
    """The Inception network, or None and the reason, which is printed: FID is never skipped silently."""
    try:
        return InceptionFeatures(resolve_inception_weights(path), device), None
    except FidUnavailable as error:
        log(f"FID will NOT be computed: {error}")
        return None, str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"), help="SD 1.x/2.x diffusers folder")
    parser.add_argument("--bench", required=True, help="MorphBench folder (Metamorphosis/, Animation/)")
    parser.add_argument("--subsets", default=",".join(SUBSETS), help="comma-separated subset folders to run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--frames", type=int, default=PAPER_FRAMES, help="frames per sequence (the paper: 17)")
    parser.add_argument("--set", action="append", default=[], help="MorphConfig option key=value (e.g. lora_steps=100)")
    parser.add_argument("--default-prompt", default="", help="prompt of every end no prompts file names")
    parser.add_argument("--limit", type=int, default=0, help="only the first N pairs (0: all)")
    parser.add_argument("--inception-weights", default=None, help="torchvision inception_v3 state dict for FID")
    parser.add_argument("--save-frames", action="store_true", help="also write each sequence as a strip PNG")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/morphbench-<time>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pairs = load_morphbench(args.bench, args.subsets.split(","), args.default_prompt)
    except MorphBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.frames < AUTHORS_MIN_FRAMES:
        print(f"error: --frames must be at least {AUTHORS_MIN_FRAMES} (the authors' PPL/PDV skip shorter "
              f"sequences; the paper uses {PAPER_FRAMES}), got {args.frames}", file=sys.stderr)
        return 2
    if args.limit:
        pairs = pairs[: args.limit]
    defaulted = sum(source == "default" for pair in pairs for source in pair.prompt_sources)
    print(f"{len(pairs)} pairs from {args.bench}; {defaulted} of {2 * len(pairs)} ends use the default prompt "
          f"{args.default_prompt!r} (no prompts file entry)")
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    try:
        config = MorphConfig.from_dict({**overrides, "num_frames": args.frames, "dtype": args.dtype, "device": args.device})
        pipe = DiffMorpherPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                   lpips_weights=_lpips_weights())
        inception, fid_reason = load_inception(args.inception_weights, pipe.models.device)
        out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / time.strftime("morphbench-%Y%m%dT%H%M%SZ", time.gmtime())
        out.mkdir(parents=True, exist_ok=True)
        report = evaluate(pipe, pairs, config, inception, frames_dir=out / "frames" if args.save_frames else None)
    except ConfigError as error:  # a bad option, a folder that is not an SD model, fp16 on a CPU
        print(f"error: {error}", file=sys.stderr)
        return 2
    report.fid_reason, report.fid_weights = fid_reason, inception.weights if inception else None
    if report.summary["metric"] != "lpips-alex":
        print(f"WARNING: PPL/PDV/endpoint LPIPS used {report.summary['metric']}, not LPIPS-alex (weights missing): "
              "not comparable; run `make setup` (python -m export.lpips_weights prepare)")
    header = (f"Model `{args.model}`, {len(pairs)} pairs of `{args.bench}`, {args.frames} frames, device "
              f"{args.device} {args.dtype}; options {json.dumps(overrides)}; metric {report.summary['metric']} "
              "(PPL/PDV: the authors' definition, LPIPS-alex at 512 px, PPL = n * sum, PDV = n^4 * variance of the "
              "n steps' distances; raw: sum / variance at the model's resolution; docs/quality.md).")
    document = {
        "model": args.model, "bench": str(args.bench), "config": config.to_dict(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(pipe.models.device)},
        "summary": report.summary, "fid": report.fid, "fid_reason": report.fid_reason,
        "fid_weights": report.fid_weights, "pairs": report.pairs,
    }
    (out / "morphbench.json").write_text(json.dumps(document, indent=1))
    (out / "morphbench.md").write_text(markdown(report, header))
    print(markdown(report, header))
    if report.fid is None:
        print(f"FID was not computed: {fid_reason}")
    print(f"Results: {out / 'morphbench.json'}, {out / 'morphbench.md'}")
    return 0


def _lpips_weights() -> Path | None:
    """The checkout's LPIPS weights where `make setup` put them (else the core's own lookup)."""
    path = REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
    return path if path.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
