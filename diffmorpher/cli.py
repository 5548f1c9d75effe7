"""Local command line: morph images without a server.

    python -m diffmorpher morph A.png B.png --prompt-a "a red circle" --prompt-b "a blue triangle" \
        --out morph.gif [--model models/tiny-shapes-sd] [--frames 16] [--set lora_steps=100]

The output format follows --out's suffix (.gif, .mp4, .zip = frames-zip; no suffix = a directory
of one PNG per frame; morph_protocol.formats) unless --format is given.

Every MorphConfig option is available, with its default, as `--set NAME=VALUE` (JSON values) and
the common ones as flags; defaults come from MorphConfig, the same as the server's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

from morph_protocol.formats import PNG, format_for_path

from .config import ConfigError, MorphConfig, OutputOptions
from .encoding import EncodedPart, encode_parts
from .results import STAGE_FRAME_READY, ProgressEvent

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-shapes-sd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffmorpher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    morph = commands.add_parser("morph", help="morph two or more images into a GIF/MP4/frames")
    morph.add_argument("images", nargs="+", type=Path, help="two or more input images, in order")
    morph.add_argument("--prompt", action="append", default=[], help="one per image, in order")
    morph.add_argument("--prompt-a", help="prompt of the first image (two-image shorthand)")
    morph.add_argument("--prompt-b", help="prompt of the second image (two-image shorthand)")
    morph.add_argument("--out", type=Path, default=Path("morph.gif"))
    morph.add_argument("--format", choices=OutputOptions.FORMATS, default=None,
                       help="default: from the --out suffix (no suffix: a directory of PNG frames)")
    morph.add_argument("--frame-duration-ms", type=int, default=OutputOptions().frame_duration_ms)
    morph.add_argument("--webp-quality", type=int, default=OutputOptions().webp_quality, metavar="0-100",
                       help="lossy WebP's quality")
    morph.add_argument("--webp-lossless", action="store_true", help="a lossless WebP (every pixel kept)")
    morph.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers SD folder or hub id")
    morph.add_argument("--device", default=None, help="a torch device such as cpu or mps (default: the best available)")
    morph.add_argument("--frames", type=int, default=MorphConfig().num_frames)
    morph.add_argument("--seed", type=int, default=MorphConfig().seed)
    morph.add_argument("--lpips-weights", default=None, help="LPIPS AlexNet backbone safetensors")
    morph.add_argument("--save-loras", type=Path, default=None,
                       help="folder to write the fitted LoRAs into, as lora_<i>.safetensors in diffusers' "
                            "LoRA format (load_lora_weights; --lora takes them back)")
    morph.add_argument("--lora", action="append", default=[], metavar="I=PATH",
                       help="use this LoRA file (e.g. a --save-loras one) for image I instead of fitting one")
    morph.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="any MorphConfig option, value as JSON (e.g. use_reschedule=false)")
    return parser


def _config_from_args(args: argparse.Namespace) -> MorphConfig:
    options: dict[str, object] = {"num_frames": args.frames, "seed": args.seed, "device": args.device}
    for item in args.set:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            options[name] = json.loads(raw)
        except json.JSONDecodeError:
            options[name] = raw
    return MorphConfig.from_dict(options)


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_a is not None or args.prompt_b is not None:
        return [args.prompt_a or "", args.prompt_b or ""]
    raise ConfigError("give one --prompt per image (or --prompt-a/--prompt-b for two images)")


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    try:
        return format_for_path(args.out)
    except ValueError as error:
        raise ConfigError(f"{error} (--format)") from None


class _ProgressBars:
    """One tqdm bar per stage, fed by the pipeline's progress events."""

    def __init__(self) -> None:
        self.bars: dict[tuple[str, int], tqdm] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == STAGE_FRAME_READY:
            return
        key = (event.stage, event.item)
        if key not in self.bars:
            self.bars[key] = tqdm(total=event.total, desc=f"{event.stage} {event.item}", leave=False)
        bar = self.bars[key]
        bar.update(event.step - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def morph_command(args: argparse.Namespace) -> int:
    from .lora_file import lora_to_safetensors
    from .pipeline import DiffMorpherPipeline  # heavy imports only when morphing

    config = _config_from_args(args)
    prompts = _prompts(args)
    output = OutputOptions(format=_output_format(args), frame_duration_ms=args.frame_duration_ms,
                           webp_quality=args.webp_quality, webp_lossless=args.webp_lossless)
    images = [Image.open(path) for path in args.images]
    pipe = DiffMorpherPipeline.from_pretrained(args.model, config.device, config.dtype, args.lpips_weights)
    loras = _read_loras(pipe, args.lora, len(prompts))  # one per endpoint (with one image: per prompt)
    bars = _ProgressBars()
    try:
        result = pipe(images, prompts, config, loras=loras, progress=bars)
    finally:
        bars.close()
    _write_parts(encode_parts(result.frames, output), args.out, output.format)
    if args.save_loras:
        args.save_loras.mkdir(parents=True, exist_ok=True)
        for index, lora in enumerate(result.loras):
            if lora is not None:
                (args.save_loras / f"lora_{index}.safetensors").write_bytes(lora_to_safetensors(lora))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"wrote {args.out} ({len(result.frames)} frames; {timings}; reschedule metric "
          f"{result.perceptual_metric})")
    return 0


def _read_loras(pipe, specs: list[str], count: int) -> list | None:
    """Per image, the LoRA of its `--lora I=PATH`, read and checked by the pipeline, or None."""
    if not specs:
        return None
    loras: list = [None] * count
    for spec in specs:
        index, sep, path = spec.partition("=")
        if not sep or not index.isdigit() or not int(index) < count:
            raise ConfigError(f"--lora expects I=PATH with I an image index 0..{count - 1}, got {spec!r}")
        loras[int(index)] = pipe.read_lora(Path(path).read_bytes(), f"--lora {index}")
    return loras


def _write_parts(parts: Sequence[EncodedPart], out: Path, fmt: str) -> None:
    """The one part to `out`, or for `png` every frame PNG into the directory `out`."""
    if fmt == PNG:
        out.mkdir(parents=True, exist_ok=True)
        for part in parts:
            (out / part.name).write_bytes(part.data)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(parts[0].data)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return morph_command(args)
    except (ConfigError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
