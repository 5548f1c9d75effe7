"""Original single file -> diffusers folder, once, at export (the export then serves the folder).

    python -m checkpoints.convert --model sd15.safetensors --out converted/sd15 [--arch sd21-base]

Offline by construction: the configs come from the file's metadata or the shipped architectures,
the tokenizer is the shipped CLIP BPE, and no diffusers single-file loader (which may fetch an
original_config yaml or a hub config) is involved. Every original key the chosen configs need
must be in the file with its shape, or the conversion stops naming the first ones missing;
keys the morph does not use (EMA weights, OpenCLIP's last layer and logit scale, a VAE loss's
discriminator) are left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from .components import components, write_configs
from .detect import CheckpointFile, choose_spec, open_checkpoint
from .errors import CheckpointError
from .keymap import from_original
from .spec import ModelSpec

logger = logging.getLogger(__name__)

# Written last into a converted folder: which file (size, mtime) and spec it came from, so a
# later export of the same file reuses the folder and a changed file is converted again.
SOURCE_FILE = "converted_from.json"


def same_shape(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal, or a 1x1 convolution (the VAE attention's) stored as its 2-D linear weight."""
    return found == expected or (len(expected) == 4 and expected[2:] == (1, 1) and found == expected[:2])


def check_shapes(checkpoint: CheckpointFile, expected: dict[str, tuple[int, ...]], part: str) -> None:
    missing = [key for key in expected if key not in checkpoint.shapes]
    wrong = [f"{key} {checkpoint.shapes[key]} (expected {expected[key]})" for key in expected
             if key in checkpoint.shapes and not same_shape(checkpoint.shapes[key], expected[key])]
    if missing or wrong:
        details = "; ".join(filter(None, [
            f"{len(missing)} keys missing, e.g. {', '.join(missing[:3])}" if missing else "",
            f"{len(wrong)} shapes differ, e.g. {', '.join(wrong[:3])}" if wrong else "",
        ]))
        raise CheckpointError(f"{checkpoint.path}: its {part} does not match the chosen architecture: {details}")


def convert_checkpoint(checkpoint: CheckpointFile, spec: ModelSpec, out: Path) -> Path:
    """Write the diffusers folder of `spec` with the file's tensors (exactly, in the file's dtype)."""
    used: set[str] = set()
    parts = components(spec)
    for part in parts:  # check every part before writing any
        expected = part.original_shapes()
        check_shapes(checkpoint, expected, part.folder)
        used |= set(expected)
    if out.exists():
        shutil.rmtree(out)
    for part in parts:
        part.save(out, from_original(checkpoint.get, part.where))
    write_configs(spec, out)
    left = len(checkpoint.shapes) - len(used)
    logger.info("converted %s -> %s (%d tensors used, %d left behind)", checkpoint.path, out, len(used), left)
    return out


def source_record(path: Path, spec: ModelSpec) -> dict[str, object]:
    stat = path.stat()
    record = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "spec": asdict(spec)}
    return json.loads(json.dumps(record))  # as it reads back from the marker file


def convert_single_file(path: Path, out: Path, *, arch: str | None = None, trust_pickle: bool = False,
                        reuse: bool = False) -> Path:
    """The diffusers folder of a single file at `out`. With `reuse`, a folder converted earlier from
    the same unchanged file with the same configs is kept as it is."""
    checkpoint = open_checkpoint(path, trust_pickle=trust_pickle)
    spec = choose_spec(checkpoint, arch)
    record = source_record(path, spec)
    marker = out / SOURCE_FILE
    if reuse and marker.is_file() and json.loads(marker.read_text()) == record:
        logger.info("reusing %s (converted earlier from the same %s)", out, path)
        return out
    convert_checkpoint(checkpoint, spec, out)
    marker.write_text(json.dumps(record, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="original single file (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    parser.add_argument("--arch", help="shipped architecture for a file without metadata (SD 2.x needs it)")
    parser.add_argument("--trust-pickle", action="store_true", help="load a .ckpt/.pt/.bin pickle (runs its code)")
    args = parser.parse_args(argv)
    try:
        convert_single_file(args.model, args.out, arch=args.arch, trust_pickle=args.trust_pickle)
    except CheckpointError as error:
        logger.error("%s", error)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
