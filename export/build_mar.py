"""Build the TorchServe archive: handler + core package + weights + model-config.yaml.

    python -m export --model models/tiny-shapes-sd --export-path model_store [--archive-format ...]

Archive formats (torch-model-archiver's `--archive-format`):
- `default`: a zip-deflated `<name>.mar`. Right for the embedded model (~25 MB).
- `zip-store`: a `.mar` without deflate. For multi-GB SD weights: safetensors barely compress,
  so deflating gigabytes only costs minutes at export and at every unpack.
- `no-archive`: a plain directory `<export-path>/<name>/` with MAR-INF/MANIFEST.json. TorchServe
  serves it in place (no unpacking into /tmp at each start); register it as `<name>=<name>`.
With `--weights external` the weights are not copied at all: the handler loads them from the
absolute `--model` path, which must exist on the serving host (e.g. a mounted volume).

`--model` may also be one original single-file checkpoint (`model.safetensors` in the CompVis /
Stability layout: SD 1.x, 2.x, SDXL base). It is converted once, offline, into a diffusers folder
(`checkpoints.convert`), which then goes the folder's way: into the archive (`--weights copy`,
converted in a temporary folder), or, with `--weights external`, into `--single-file-out`
(default: `<file's folder>/<file name without suffix>-diffusers/`, beside the file), the path the
archive references; a later export of the unchanged file reuses that folder. A file the project
wrote carries its configs; a hub file is matched to a shipped architecture, and an SD 2.x file
needs `--single-file-arch sd21-base|sd21` (its prediction type is not in the weights). Pickles
(.ckpt/.pt/.bin) are refused unless `--trust-pickle`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from checkpoints.architectures import ARCHITECTURES
from checkpoints.convert import convert_single_file
from checkpoints.detect import is_single_file
from checkpoints.errors import CheckpointError
from diffmorpher.config import ConfigError, MorphConfig
from diffmorpher.families import ModelFamily, detect_family
from morph_protocol import limits, properties

REPO_ROOT = Path(__file__).resolve().parent.parent
# What the worker imports, shipped inside the archive (tested to import with nothing else of the
# project on the path): the TorchServe adapter, the core, and the protocol it shares with the
# guard and the clients. The archiver copies the handler module to the archive root as the entry
# point; it imports its siblings as `handler.*`.
ARCHIVE_PACKAGES = ("handler", "diffmorpher", "morph_protocol")
HANDLER_FILE = REPO_ROOT / "handler" / "torchserve_handler.py"
TEMPLATE = Path(__file__).resolve().parent / "model-config.yaml"
DEFAULT_LPIPS = REPO_ROOT / ".cache" / "lpips" / "lpips_alex_backbone.safetensors"
ARCHIVE_FORMATS = ("default", "zip-store", "no-archive", "tgz")

logger = logging.getLogger("export")


# A model folder's own morph defaults, beneath the export's --default options: what measured best
# on that model (the embedded model's is in docs/quality.md, "Which default the numbers support").
MODEL_DEFAULTS_FILE = "morph_defaults.json"


class ExportError(RuntimeError):
    """The inputs cannot make a servable archive."""


def model_defaults(model: Path) -> dict[str, Any]:
    """The model folder's morph_defaults.json (keys starting with "_" are comments), or {}."""
    path = model / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ExportError(f"{path} must hold a JSON object of MorphConfig options")
    defaults = {key: value for key, value in content.items() if not key.startswith("_")}
    logger.info("morph defaults of the model (%s): %s", path.name, defaults)
    return defaults


def check_sd_folder(model: Path) -> ModelFamily:
    """A diffusers folder of a supported family (diffmorpher.families: SD 1.x/2.x or SDXL base):
    model_index.json plus the parts the morph loads. Returns the family."""
    if not model.is_dir():
        raise ExportError(f"model folder {model} does not exist (train or download it first)")
    try:
        family = detect_family(model)
    except ConfigError as error:
        raise ExportError(str(error)) from error
    missing = [name for name in family.subfolders if not (model / name).is_dir()]
    if missing or not (model / "model_index.json").is_file():
        raise ExportError(
            f"{model} is not a diffusers Stable Diffusion folder: missing "
            f"{missing + ([] if (model / 'model_index.json').is_file() else ['model_index.json'])}"
        )
    return family


def copy_weights(model: Path, destination: Path) -> None:
    """Copy only what the morph loads: the family's parts and model_index.json. Where a part has
    both .safetensors and legacy .bin weights, the .bin files are left out."""
    destination.mkdir(parents=True)
    shutil.copy2(model / "model_index.json", destination / "model_index.json")
    for name in detect_family(model).subfolders:
        source = model / name
        has_safetensors = any(source.glob("*.safetensors"))
        ignore = shutil.ignore_patterns("*.bin", "*.ckpt", "*.msgpack", "*.onnx*") if has_safetensors \
            else shutil.ignore_patterns("*.msgpack", "*.onnx*")
        shutil.copytree(source, destination / name, ignore=ignore)


def archive_max_response_bytes(config_properties: Path) -> int:
    """max_response_size of the config.properties the archive will be served with, so the handler
    refuses what the frontend would (limits.MAX_RESPONSE_BYTES where there is no such file)."""
    if not config_properties.is_file():
        return limits.MAX_RESPONSE_BYTES
    return properties.max_response_bytes(properties.read_properties(config_properties))



def render_model_config(
    *,
    model_dir: str,
    lpips_weights: str,
    max_response_bytes: int,
    device_type: str,
    workers: int,
    response_timeout: int | None,
    defaults: dict[str, Any],
) -> dict[str, Any]:
    """The template with this export's values; defaults come from MorphConfig (one source)."""

    config = yaml.safe_load(TEMPLATE.read_text())
    try:
        morph_defaults = MorphConfig.from_dict(defaults).to_dict()  # validates the overrides
    except ConfigError as error:
        raise ExportError(f"invalid morph default ({MODEL_DEFAULTS_FILE} or --default): {error}") from error
    morph_defaults.pop("device", None)  # the worker's device comes from TorchServe's gpu_id
    if device_type == "cpu" and morph_defaults.get("dtype") == "float16":
        raise ExportError(
            "dtype float16 needs a GPU: with --device-type cpu every worker would fail to load. "
            "Export with --device-type gpu, or use dtype float32 or bfloat16"
        )
    # Unless the export says otherwise (--default dtype=...), dtype stays MorphConfig's "auto": each
    # worker runs in its device's precision (diffmorpher.devices.default_dtype: bf16 on a GPU that
    # has it, else fp16; fp32 on the CPU), which only the serving host knows.
    config["deviceType"] = device_type
    config["minWorkers"] = config["maxWorkers"] = workers
    if response_timeout is not None:
        config["responseTimeout"] = response_timeout
    config["handler"].update(
        model_dir=model_dir,
        lpips_weights=lpips_weights,
        max_response_bytes=max_response_bytes,
        defaults=morph_defaults,
    )
    return config


def stage(
    staging: Path,
    model: Path,
    *,
    weights: str,
    lpips: Path | None,
) -> None:
    """Lay out the archive's extra files under `staging` (they land at the archive root)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ARCHIVE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, staging / package, ignore=ignore)
    if weights == "copy":
        copy_weights(model, staging / "model")
    if lpips is not None:
        (staging / "lpips").mkdir()
        shutil.copy2(lpips, staging / "lpips" / lpips.name)


def converted_folder(path: Path, args: argparse.Namespace, tmp: Path) -> Path:
    """The diffusers folder of a single-file checkpoint: converted for this export only where its
    weights are copied into the archive, kept beside the file (or at --single-file-out) and reused
    where the archive references it (--weights external)."""
    if args.single_file_out:
        out, keep = Path(args.single_file_out).resolve(), True
    elif args.weights == "external":
        out, keep = path.with_name(f"{path.stem}-diffusers"), True
    else:
        out, keep = tmp / "converted", False
    try:
        return convert_single_file(path, out, arch=args.single_file_arch, trust_pickle=args.trust_pickle, reuse=keep)
    except CheckpointError as error:
        raise ExportError(str(error)) from error


def build(args: argparse.Namespace) -> Path:
    with tempfile.TemporaryDirectory(prefix="diffmorpher-export-") as tmp:
        model = Path(args.model).resolve()
        if is_single_file(model):
            model = converted_folder(model, args, Path(tmp))
        return build_from_folder(args, model, Path(tmp))


def build_from_folder(args: argparse.Namespace, model: Path, tmp: Path) -> Path:
    """The archive of a diffusers folder; `tmp` holds the staging files until it is written."""
    check_sd_folder(model)
    export_path = Path(args.export_path).resolve()
    export_path.mkdir(parents=True, exist_ok=True)
    lpips = Path(args.lpips_weights).resolve() if args.lpips_weights else None
    if lpips is not None and not lpips.is_file():
        logger.warning("LPIPS weights %s not found: the archive ships none and the worker uses "
                       "the pixel fallback (run `make setup` to prepare them)", lpips)
        lpips = None
    defaults = model_defaults(model)
    for item in args.default:
        key, _, raw = item.partition("=")
        defaults[key] = yaml.safe_load(raw)
    model_config = render_model_config(
        model_dir="model" if args.weights == "copy" else str(model),
        lpips_weights=f"lpips/{lpips.name}" if lpips else "",
        max_response_bytes=archive_max_response_bytes(Path(args.config_properties)),
        device_type=args.device_type,
        workers=args.workers,
        response_timeout=args.response_timeout,
        defaults=defaults,
    )
    staging = tmp / "extra"
    staging.mkdir()
    stage(staging, model, weights=args.weights, lpips=lpips)
    config_file = tmp / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(model_config, sort_keys=False))
    command = [
        str(Path(sys.executable).with_name("torch-model-archiver")),
        "--model-name", args.name,
        "--version", args.version,
        "--handler", str(HANDLER_FILE),
        "--extra-files", str(staging),
        "--config-file", str(config_file),
        "--export-path", str(export_path),
        "--archive-format", args.archive_format,
        "--force",
    ]  # fmt: skip
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True)
    suffix = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
    return export_path / f"{args.name}{suffix[args.archive_format]}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"),
                        help="diffusers SD 1.x/2.x or SDXL-base folder, or an original single-file "
                             "checkpoint (.safetensors) of one (default: the embedded model)")
    parser.add_argument("--name", default="diffmorpher", help="model name in TorchServe")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--export-path", default=str(REPO_ROOT / "model_store"))
    parser.add_argument("--archive-format", choices=ARCHIVE_FORMATS, default="default")
    parser.add_argument("--weights", choices=("copy", "external"), default="copy",
                        help="copy the weights into the archive, or load them from --model's path")
    parser.add_argument("--single-file-arch", choices=sorted(ARCHITECTURES),
                        help="architecture of a single file without the project's metadata (SD 2.x needs it: "
                             "sd21-base = 512 px epsilon, sd21 = 768 px v-prediction)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="accept a .ckpt/.pt/.bin pickle single file (loading it runs its code)")
    parser.add_argument("--single-file-out",
                        help="where a single file's converted diffusers folder is kept (default: beside the "
                             "file with --weights external, a temporary folder with --weights copy)")
    parser.add_argument("--lpips-weights", default=str(DEFAULT_LPIPS),
                        help="LPIPS backbone safetensors to ship ('' for none)")
    parser.add_argument("--device-type", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--response-timeout", type=int, help="seconds (default: the template's)")
    parser.add_argument("--config-properties", default=str(REPO_ROOT / "config.properties"),
                        help="read max_response_size from here")
    parser.add_argument("--default", action="append", default=[],
                        help="override a morph default, e.g. --default num_frames=8")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        path = build(args)
    except (ExportError, subprocess.CalledProcessError) as error:
        logger.error("%s", error)
        return 1
    print(f"wrote {path}")
    return 0
