"""Which model a single file holds, from its header alone, and the files refused.

A `CheckpointFile` is the file's key -> shape table, its header metadata and a way to read one
tensor: for safetensors all three come from the header (nothing is loaded to decide); a pickle
(`.ckpt`, `.pt`, `.pth`, `.bin`) runs code when loaded, so it is opened only when the user says
they trust it.

`choose_spec` picks the diffusers configs: the file's own (`spec.METADATA_KEY`, written by
`checkpoints.write_single_file`) or, for a hub file, a shipped architecture matched on keys and
shapes: the UNet's cross-attention width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL) and the text
encoder layout. SD 2.x's prediction type (512 px epsilon or 768 px v-prediction) is not in the
weights: the caller must name it. Everything else the morph cannot serve is refused here, naming
what was found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .architectures import ARCHITECTURES
from .errors import CheckpointError
from .keymap import SD_TEXT_PREFIXES, SDXL_TEXT_PREFIXES, UNET_PREFIX, CLIP, OPENCLIP
from .spec import ModelSpec, for_architecture

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
SD2_CHOICES = ("sd21-base", "sd21")
SUPPORTED = ("supported: original (LDM) single files of SD 1.x (sd15), SD 2.x (sd21-base, sd21) and "
             "SDXL base (sdxl-base), or a diffusers folder")
CONTEXT_DIMS = {768: "sd15", 1024: "sd21-base", 2048: "sdxl-base"}


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    get: Callable[[str], torch.Tensor]


def is_single_file(path: Path) -> bool:
    """A path export should treat as a single-file checkpoint rather than a diffusers folder."""
    return path.is_file() or (not path.exists() and path.suffix.lower() in SINGLE_FILE_SUFFIXES)


def open_checkpoint(path: Path, *, trust_pickle: bool = False) -> CheckpointFile:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} is a pickle checkpoint ({suffix}): loading it runs any code it contains. Convert "
                "it to .safetensors, or, if you trust its source, pass --trust-pickle (make export TRUST_PICKLE=1)"
            )
        return _open_pickle(path)
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; {SUPPORTED}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return CheckpointFile(path, shapes, handle.metadata() or {}, handle.get_tensor)


def _open_pickle(path: Path) -> CheckpointFile:
    logger.warning("loading pickle checkpoint %s (trusted by --trust-pickle)", path)
    content = torch.load(path, map_location="cpu", weights_only=False)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict; {SUPPORTED}")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    return CheckpointFile(path, {key: tuple(value.shape) for key, value in tensors.items()}, {},
                          tensors.__getitem__)


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def refuse_unsupported(shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """CheckpointError for a file that is not a full SD 1.x/2.x/SDXL-base checkpoint."""
    keys = list(shapes)
    lora = [key for key in keys if key.startswith(("lora_unet_", "lora_te")) or ".lora_down." in key
            or ".lora_up." in key or ".lora_A." in key or ".lora_B." in key]
    if lora:
        raise CheckpointError(f"{name} is a LoRA file ({len(lora)} LoRA keys, e.g. {_examples(lora)}), not a "
                              f"full checkpoint; the morph fits its own LoRAs. {SUPPORTED}")
    for marker, what in (("joint_blocks", "an SD3 (MMDiT) checkpoint"), ("double_blocks", "a Flux checkpoint")):
        found = [key for key in keys if marker in key]
        if found:
            raise CheckpointError(f"{name} is {what} (keys {_examples(found)}): a transformer, not a UNet. "
                                  f"{SUPPORTED}")
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise CheckpointError(f"{name} has no UNet keys ({UNET_PREFIX}*); found {len(keys)} keys like "
                              f"{_examples(keys)}. {SUPPORTED}")
    has_embedders = any(key.startswith("conditioner.embedders.") for key in keys)
    if has_embedders and not any(key.startswith(SDXL_TEXT_PREFIXES[1]) for key in keys):
        raise CheckpointError(f"{name} is an SDXL refiner (one OpenCLIP embedder, conditioner.embedders.0.model.*); "
                              f"the morph needs SDXL base. {SUPPORTED}")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        what = "an inpainting model" if conv_in[1] == 9 else "not a text-to-image model"
        raise CheckpointError(f"{name}: the UNet takes {conv_in[1]} input channels ({what}); the morph needs the "
                              f"4-channel text-to-image UNet. {SUPPORTED}")


def detect_architecture(shapes: dict[str, tuple[int, ...]], requested: str | None = None, *,
                        name: str = "the file") -> str:
    """The shipped architecture of a file without metadata, from its keys and shapes."""
    refuse_unsupported(shapes, name)
    cross = [shape for key, shape in shapes.items() if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")]
    if not cross:
        raise CheckpointError(f"{name}: a UNet without cross-attention (no attn2.to_k); {SUPPORTED}")
    context = cross[0][1]
    if any(key.startswith(SDXL_TEXT_PREFIXES[1]) for key in shapes):
        layout = "sdxl"
    elif any(key.startswith(SD_TEXT_PREFIXES[OPENCLIP]) for key in shapes):
        layout = OPENCLIP
    elif any(key.startswith(SD_TEXT_PREFIXES[CLIP]) for key in shapes):
        layout = CLIP
    else:
        raise CheckpointError(f"{name} has no text encoder (cond_stage_model.* or conditioner.embedders.*); "
                              f"{SUPPORTED}")
    found = CONTEXT_DIMS.get(context)
    expected_layout = {"sd15": CLIP, "sd21-base": OPENCLIP, "sdxl-base": "sdxl"}.get(found or "")
    if found is None or expected_layout != layout:
        raise CheckpointError(f"{name}: a UNet with cross-attention width {context} and a {layout} text encoder "
                              f"match no shipped architecture; {SUPPORTED}")
    if found == "sd21-base":
        if requested not in SD2_CHOICES:
            raise CheckpointError(
                f"{name} is an SD 2.x checkpoint (OpenCLIP text encoder, cross-attention width 1024); its "
                "prediction type is not in the weights. Pass --single-file-arch sd21-base (512 px, epsilon: "
                "stable-diffusion-2-1-base) or --single-file-arch sd21 (768 px, v-prediction: "
                "stable-diffusion-2-1); with make: make export MODEL=... SINGLE_FILE_ARCH=sd21-base"
            )
        return requested
    if requested is not None and requested != found:
        raise CheckpointError(f"{name} holds {found} (cross-attention width {context}), not the requested "
                              f"--single-file-arch {requested}")
    return found


def choose_spec(checkpoint: CheckpointFile, requested: str | None = None) -> ModelSpec:
    """The file's own spec where it carries one, else the detected shipped architecture's."""
    if requested is not None and requested not in ARCHITECTURES:
        raise CheckpointError(f"--single-file-arch {requested!r}: choose one of {', '.join(ARCHITECTURES)}")
    name = str(checkpoint.path)
    own = ModelSpec.from_metadata(checkpoint.metadata)
    if own is not None:
        refuse_unsupported(checkpoint.shapes, name)
        if requested is not None:
            logger.warning("%s carries its own configs (written by checkpoints.write_single_file): "
                           "--single-file-arch %s is not used", name, requested)
        return own
    arch = detect_architecture(checkpoint.shapes, requested, name=name)
    logger.info("%s: detected %s", name, arch)
    return for_architecture(ARCHITECTURES[arch])
