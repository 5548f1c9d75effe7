"""Command line: `python -m client morph a.png b.png --prompt-a ... --prompt-b ... --out morph.gif`.

Examples::

    python -m client ping
    python -m client morph a.png b.png --prompt-a "a red circle" --prompt-b "a blue triangle" \\
        --frames 16 --out out/morph.gif --out out/morph.mp4 --stream
    python -m client morph a.png b.png c.png --prompt "a" --prompt "b" --prompt "c" \\
        --option lora_steps=50 --format png --out out/frames/
    python -m client morph red.png --prompt "a red circle" --prompt "a blue circle" --out out/morph.gif
        (one image: the server makes the blue circle from it; saved as out/morph.endpoint_1.png)
    python -m client morph a.png b.png --prompt-a ... --prompt-b ... --save-loras out/loras/
    python -m client morph a.png b.png --prompt-a ... --prompt-b ... \
        --lora 0=out/loras/lora_0.safetensors --lora 1=out/loras/lora_1.safetensors

The output format follows each --out's suffix (.gif, .mp4, .webp, .zip = frames-zip; no suffix =
a directory of one PNG per frame; morph_protocol.formats) unless --format is given. A WebP is
lossy at --webp-quality (0-100; the server's default when absent) or, with --webp-lossless,
keeps every pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from morph_protocol import limits, wire
from morph_protocol.formats import FORMATS, format_for_path
from morph_protocol.keyfile import TokenError, TokenSource
from .morph_client import DEFAULT_MAX_MESSAGE_MB, DEFAULT_MODEL, DEFAULT_TARGET, MorphClient, MorphClientError, MorphResult


def _parse_option(text: str) -> tuple[str, Any]:
    """`key=value`, value parsed as JSON when it is JSON (numbers, true/false, null)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def _webp_quality(text: str) -> int:
    """--webp-quality, checked against morph_protocol.limits before anything is sent."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not limits.MIN_WEBP_QUALITY <= value <= limits.MAX_WEBP_QUALITY:
        raise argparse.ArgumentTypeError(
            f"must be between {limits.MIN_WEBP_QUALITY} and {limits.MAX_WEBP_QUALITY}, got {value}"
        )
    return value


def _parse_lora(text: str) -> tuple[int, Path]:
    """`I=PATH`: the LoRA file for image I."""
    index, sep, path = text.partition("=")
    if not sep or not index.strip().isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--lora expects I=PATH (image index, LoRA file), got {text!r}")
    return int(index), Path(path)


def _read_loras(args: argparse.Namespace) -> list[bytes | None] | None:
    """Per endpoint (each image; with one image, each prompt's endpoint), the bytes of its
    --lora file, or None (no --lora at all: None)."""
    if not args.lora:
        return None
    one_image = len(args.images) == 1
    count = len(args.prompt or []) if one_image else len(args.images)
    what = "prompts (one image: one endpoint per prompt)" if one_image else "images"
    loras: list[bytes | None] = [None] * count
    for index, path in args.lora:
        if index >= count:
            raise SystemExit(f"--lora {index}={path}: there are only {count} {what} (0..{count - 1})")
        if loras[index] is not None:
            raise SystemExit(f"--lora {index}=...: image {index} has two LoRAs")
        try:
            size = path.stat().st_size
            if size > limits.MAX_LORA_BYTES:
                raise SystemExit(f"LoRA {path} is {size} bytes; the service takes at most {limits.MAX_LORA_BYTES}")
            loras[index] = path.read_bytes()
        except OSError as error:
            raise SystemExit(f"cannot read LoRA {path}: {error}") from error
    return loras


def format_for(out: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return format_for_path(out)
    except ValueError as error:
        raise SystemExit(f"{error} (--format)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="gRPC inference address host:port")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name")
    parser.add_argument("--token", help="bearer token (default: $DIFFMORPHER_TOKEN or the key file)")
    parser.add_argument("--key-file", help="TorchServe's key_file.json (default ./key_file.json)")
    parser.add_argument("--no-auth", action="store_true", help="send no token (auth disabled)")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB, help="gRPC message size limit")
    parser.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE only")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("ping", help="check the server's health")

    wait = commands.add_parser("wait", help="wait until the server reports Healthy (model ready)")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds")
    wait.add_argument("--model-ready", action="store_true",
                      help="first wait until the model's worker is READY (TorchServe's management API, "
                           "with the key file's management key); fail at once when it dies loading")
    wait.add_argument("--ts-config", type=Path, default=Path("config.properties"),
                      help="config.properties naming the management address (--model-ready)")
    wait.add_argument("--management-url", help="the management API, e.g. http://127.0.0.1:8081 (default: --ts-config's)")
    wait.add_argument("--model-log", type=Path, help="TorchServe's logs/model_log.log: a worker death there fails the wait")
    wait.add_argument("--log-offset", type=int, default=None,
                      help="read --model-log from this byte (its size before TorchServe started; default: its size now)")

    strip = commands.add_parser("strip", help="lay frame PNGs side by side into one picture")
    strip.add_argument("frames_dir", type=Path, help="directory of frame_*.png")
    strip.add_argument("--out", type=Path, required=True)
    strip.add_argument("--max-frames", type=int, default=8, help="evenly chosen, first and last kept")

    morph = commands.add_parser("morph", help="morph two or more images")
    morph.add_argument("images", nargs="+", help="input images, in morph order; `ref:<image_key>` "
                       "reuses an image a previous result named (its fitted LoRA, no upload)")
    morph.add_argument("--prompt-a", help="prompt of the first image (two-image morphs)")
    morph.add_argument("--prompt-b", help="prompt of the second image (two-image morphs)")
    morph.add_argument("--prompt", action="append", default=[],
                       help="one per image, in order; with ONE image, two or more: the server makes "
                            "an endpoint from the image for each prompt after the first and morphs through them")
    morph.add_argument("--frames", type=int, help="number of frames (num_frames)")
    morph.add_argument("--seed", type=int, help="random seed")
    morph.add_argument("--option", action="append", type=_parse_option, default=[],
                       help="any MorphConfig option as key=value, e.g. lora_steps=50")
    morph.add_argument("--format", choices=FORMATS,
                       help="output format (default: from --out's suffix)")
    morph.add_argument("--frame-duration-ms", type=int, help="GIF/MP4/WebP frame duration")
    morph.add_argument("--webp-quality", type=_webp_quality, metavar="0-100",
                       help="lossy WebP's quality (default: the server's)")
    morph.add_argument("--webp-lossless", action="store_true", help="a lossless WebP (every pixel kept)")
    morph.add_argument("--out", action="append", type=Path, default=[],
                       help="output path; repeat to get several formats from one morph")
    morph.add_argument("--stream", action="store_true", help="stream progress and frames")
    morph.add_argument("--frames-dir", type=Path, help="with --stream: also save each frame PNG")
    morph.add_argument("--deadline", type=float, default=1800.0, help="seconds before giving up")
    morph.add_argument("--metadata-out", type=Path, help="write the result metadata JSON here")
    morph.add_argument("--save-loras", type=Path, metavar="DIR",
                       help="ask for the morph's LoRAs (return_loras) and write them here as "
                            "lora_<i>.safetensors (diffusers' LoRA format)")
    morph.add_argument("--lora", action="append", type=_parse_lora, default=[], metavar="I=PATH",
                       help="use this LoRA file for image I instead of fitting one (e.g. a --save-loras "
                            "file); repeat per image")
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_a is not None and args.prompt_b is not None and len(args.images) == 2:
        return [args.prompt_a, args.prompt_b]
    raise SystemExit("give --prompt-a and --prompt-b (two images) or one --prompt per image")


def _options(args: argparse.Namespace, formats: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = dict(args.option)
    if args.frames is not None:
        options["num_frames"] = args.frames
    if args.seed is not None:
        options["seed"] = args.seed
    if args.frame_duration_ms is not None:
        options["frame_duration_ms"] = args.frame_duration_ms
    if args.webp_quality is not None:
        options["webp_quality"] = args.webp_quality
    if args.webp_lossless:
        options["webp_lossless"] = True
    options["format"] = formats[0] if len(formats) == 1 else formats
    if args.save_loras is not None:
        options["return_loras"] = True
    return options


class _ProgressBar:
    """A tqdm bar per stage, fed by the stream's progress and frame messages."""

    def __init__(self, frames_dir: Path | None) -> None:
        self.frames_dir = frames_dir
        self.bar = None
        self.stage = None

    def __call__(self, message: wire.Message) -> None:
        from tqdm import tqdm

        header = message.header
        if message.type == wire.TYPE_PROGRESS:
            label = f"{header['stage']}" + (f" #{header['item']}" if header.get("item") else "")
            if label != self.stage:
                self.close()
                self.stage = label
                self.bar = tqdm(total=header["total"], desc=label, unit="step", leave=True)
            self.bar.n = header["step"]
            self.bar.refresh()
        elif message.type == wire.TYPE_FRAME and self.frames_dir is not None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            part = message.part()
            (self.frames_dir / part.name).write_bytes(part.data)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


REF_PREFIX = "ref:"


def _read_image(argument: str) -> bytes | wire.ImageRef:
    """A `ref:<image_key>` reference, or the file's bytes after checking locally that it is an
    image (saves an upload)."""
    from PIL import Image, UnidentifiedImageError

    if argument.startswith(REF_PREFIX):
        return wire.ImageRef(argument[len(REF_PREFIX):])
    path = Path(argument)
    try:
        with Image.open(path) as image:
            image.verify()
        return path.read_bytes()
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"cannot read image {path}: {error}") from error


def _run_morph(client: MorphClient, args: argparse.Namespace) -> int:
    outs = args.out or [Path("morph.gif")]
    formats = [format_for(out, args.format) for out in outs]
    images = [_read_image(path) for path in args.images]
    loras = _read_loras(args)
    options = _options(args, formats)
    if args.stream:
        bar = _ProgressBar(args.frames_dir)
        try:
            result: MorphResult = client.morph_stream(
                images, _prompts(args), options, deadline_s=args.deadline, on_event=bar, loras=loras
            )
        finally:
            bar.close()
    else:
        result = client.morph(images, _prompts(args), options, deadline_s=args.deadline, loras=loras)
    for out, fmt in zip(outs, formats):
        for path in result.save(out, fmt):
            print(f"wrote {path}")
    for path in result.save_endpoints(outs[0]):
        print(f"wrote {path} (an endpoint the server made)")
    if args.save_loras is not None:
        for path in result.save_loras(args.save_loras):
            print(f"wrote {path}")
    meta = result.metadata
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in meta.get("timings", {}).items())
    print(f"{meta.get('num_frames')} frames, seed {meta.get('seed')}, "
          f"metric {meta.get('perceptual_metric')}; {timings}")
    keys = [entry.get("image_key") for entry in meta.get("cache", [])]
    if any(keys):
        print("to morph these images again without sending them: " + " ".join(f"{REF_PREFIX}{k}" for k in keys if k))
    if args.metadata_out:
        args.metadata_out.parent.mkdir(parents=True, exist_ok=True)
        args.metadata_out.write_text(json.dumps(meta, indent=2))
    return 0


def _wait(args: argparse.Namespace, tokens: TokenSource) -> int:
    """Poll Ping until "Healthy" (TorchServe says so once every model has its workers). The key
    file appears only after TorchServe started, so token errors are retried too."""
    deadline = time.monotonic() + args.timeout
    if args.model_ready and _wait_model_ready(args) != 0:
        return 1
    last = "no answer"
    while True:
        try:
            with MorphClient(args.target, args.model, tokens=tokens, retries=0) as client:
                health = client.ping(timeout_s=5.0)
            if "Healthy" in health and "Partial" not in health and "Unhealthy" not in health:
                print(f"TorchServe on {args.target} is ready")
                return 0
            last = health
        except (MorphClientError, TokenError) as error:
            last = str(error)
            tokens.refresh_quietly()
        if time.monotonic() >= deadline:
            print(f"error: TorchServe on {args.target} not ready after {args.timeout:.0f}s: {last}",
                  file=sys.stderr)
            return 1
        time.sleep(1.0)


def _wait_model_ready(args: argparse.Namespace) -> int:
    """The model's worker READY per the management API (morph_protocol.management, the wait the
    test launcher uses too), with a progress line every few seconds."""
    from morph_protocol.management import ManagementApi, WorkerLoadError, log_size, wait_for_worker
    from morph_protocol.properties import read_properties

    url = args.management_url or read_properties(args.ts_config).get("management_address", "http://127.0.0.1:8081")
    key_file = None if args.no_auth else Path(args.key_file or "key_file.json")
    offset = args.log_offset if args.log_offset is not None else log_size(args.model_log)
    try:
        waited = wait_for_worker(ManagementApi(url, key_file, timeout_s=5.0), args.model, args.timeout,
                                 model_log=args.model_log, log_offset=offset,
                                 progress=lambda line: print(line, flush=True))
    except WorkerLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"worker of {args.model} READY after {waited:.0f} s", flush=True)
    return 0


def _strip(args: argparse.Namespace) -> int:
    from PIL import Image

    paths = sorted(args.frames_dir.glob("frame_*.png"))
    if not paths:
        raise SystemExit(f"no frame_*.png in {args.frames_dir}")
    count = min(args.max_frames, len(paths))
    chosen = [paths[round(i * (len(paths) - 1) / max(count - 1, 1))] for i in range(count)]
    frames = [Image.open(p).convert("RGB") for p in chosen]
    width, height = frames[0].size
    sheet = Image.new("RGB", (width * len(frames) + 2 * (len(frames) - 1), height), "white")
    for index, frame in enumerate(frames):
        sheet.paste(frame, (index * (width + 2), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(frames)} of {len(paths)} frames)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "strip":
        return _strip(args)
    tokens = TokenSource(token=args.token, key_file=args.key_file, enabled=not args.no_auth)
    if args.command == "wait":
        return _wait(args, tokens)
    try:
        with MorphClient(args.target, args.model, tokens=tokens,
                         max_message_mb=args.max_message_mb, retries=args.retries) as client:
            if args.command == "ping":
                print(client.ping())
                return 0
            return _run_morph(client, args)
    except (MorphClientError, TokenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
