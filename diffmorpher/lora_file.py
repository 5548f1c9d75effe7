"""Fitted LoRAs as files a client keeps, and LoRAs a client sends instead of having them fitted.

The file is diffusers' own LoRA format, what `StableDiffusionPipeline.save_lora_weights` writes
and `load_lora_weights` reads: safetensors with, per UNet attention projection, the keys
`unet.<module>.lora_A.weight` (down, (r, in)) and `unet.<module>.lora_B.weight` (up, (out, r)),
and the metadata entry `lora_adapter_metadata`: the peft LoraConfig (`unet.r`,
`unet.lora_alpha`, `unet.target_modules`) as JSON. A LoRA written here loads into the served
model with diffusers or peft, and sent back it gives the frames the fitted one gave (fp32, as
fitted: no rounding on the way).

A sent LoRA (the authors' `load_lora_path`) is read from untrusted bytes: the safetensors header
is checked (keys, shapes, dtypes, rank) against the served UNet before any tensor is built, and
every refusal is a ConfigError naming the request field and the bad key or shape.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from morph_protocol import limits, wire

from .config import FIELD, LORA_TARGET_MODULES, ConfigError, name_list, show

Lora = dict[str, torch.Tensor]

UNET_PREFIX = "unet."  # diffusers' prefix of a pipeline LoRA's UNet keys
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
DOWN, UP = "lora_A", "lora_B"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the float types a LoRA may use
_HEADER_SIZE = struct.Struct("<Q")  # safetensors: an 8-byte little-endian header length first


def lora_module_shapes(unet: UNet2DConditionModel) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every UNet linear layer a LoRA is fitted on (the
    attention projections of LORA_TARGET_MODULES), by module path: what a sent LoRA may
    hold."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGET_MODULES):
            shapes[name] = (int(module.in_features), int(module.out_features))
    return shapes


def lora_rank(lora: Lora) -> int | None:
    """The rank of a LoRA's down matrices (None for a dict without a 2-D lora_A)."""
    for key in sorted(lora):
        if key.endswith(f".{DOWN}.weight") and lora[key].dim() == 2:
            return int(lora[key].shape[0])
    return None


def lora_to_safetensors(lora: Lora) -> bytes:
    """A fitted LoRA (peft keys, alpha == rank) as a diffusers LoRA file, in fp32."""
    rank = lora_rank(lora)
    if rank is None:
        raise ValueError("a LoRA needs lora_A weights to be written")
    modules = sorted(key[: -len(f".{DOWN}.weight")] for key in lora if key.endswith(f".{DOWN}.weight"))
    config = {"r": rank, "lora_alpha": rank, "target_modules": modules, "init_lora_weights": "gaussian"}
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{UNET_PREFIX}{k}": v for k, v in config.items()}, sort_keys=True),
    }
    tensors = {f"{UNET_PREFIX}{key}": tensor.detach().float().contiguous().cpu() for key, tensor in lora.items()}
    return safetensors.torch.save(tensors, metadata=metadata)


def read_lora(
    data: bytes,
    shapes: Mapping[str, tuple[int, int]],
    *,
    field: str | None = None,
    max_rank: int = limits.MAX_LORA_RANK,
    max_bytes: int = limits.MAX_LORA_BYTES,
) -> Lora:
    """A sent LoRA file as the pipeline's LoRA (peft keys, fp32, scaling folded into lora_B),
    checked against the served UNet's `shapes` (lora_module_shapes). Keys with or without
    diffusers' `unet.` prefix; modules it does not cover get a zero LoRA (no change to them).
    Raises ConfigError naming `field` and the first bad key, shape, rank or size."""
    if not data:
        raise _error(f"{FIELD} is empty; expected a LoRA as safetensors", field)
    if len(data) > max_bytes:
        raise _error(f"{FIELD} is {len(data)} bytes; a LoRA may have at most {max_bytes} bytes "
                     f"(limits.MAX_LORA_BYTES)", field)
    header, metadata = _read_header(data, field)
    modules = _check_keys(header, shapes, field)
    rank = _check_shapes(header, modules, shapes, field, max_rank)
    scaling = _scaling(metadata, rank, field)
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as error:  # noqa: BLE001 - a damaged file is the sender's
        raise _error(f"{FIELD} is a damaged safetensors file: {str(error)[:200]}", field) from error
    lora: Lora = {}
    for module, (key_down, key_up) in modules.items():
        down, up = tensors[key_down].float(), tensors[key_up].float()
        for key, tensor in ((key_down, down), (key_up, up)):
            if not torch.isfinite(tensor).all():
                raise _error(f"{FIELD} has NaN or infinite values in {show(key)}", field)
        lora[f"{module}.{DOWN}.weight"] = down.contiguous()
        lora[f"{module}.{UP}.weight"] = (up * scaling if scaling != 1.0 else up).contiguous()
    for module, (in_features, out_features) in shapes.items():
        if module not in modules:
            lora[f"{module}.{DOWN}.weight"] = torch.zeros(rank, in_features)
            lora[f"{module}.{UP}.weight"] = torch.zeros(out_features, rank)
    return lora


def check_lora_ranks(given: list[Lora | None], fitted_rank: int | None) -> None:
    """One rank for a morph's LoRAs (they are interpolated matrix by matrix): every sent LoRA's
    equals the others' and, when some image's LoRA is fitted (`fitted_rank`, the morph's
    lora_rank), that one. The error names the first sent LoRA (`lora_<i>`) that differs."""
    expected = fitted_rank
    for index, lora in enumerate(given):
        rank = lora_rank(lora) if lora is not None else None
        if rank is None:
            continue
        if expected is None:
            expected = rank
        elif rank != expected:
            reason = f"the morph's lora_rank {fitted_rank} (the other images' LoRAs are fitted)" \
                if fitted_rank is not None else f"the rank {expected} of the other LoRAs sent"
            raise ConfigError(f"{FIELD} has rank {rank}; it must equal {reason}: LoRAs are interpolated "
                              f"matrix by matrix", field=wire.lora_key(index))


# ---------------------------------------------------------------------------- checks of a sent file
def _error(message: str, field: str | None) -> ConfigError:
    return ConfigError(message if field is not None else message.replace(FIELD, "the LoRA", 1), field=field)


def _read_header(data: bytes, field: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors header (tensor entries) and its `__metadata__`, from the bytes alone."""
    not_safetensors = f"{FIELD} is not a safetensors file ({len(data)} bytes starting {bytes(data[:8])!r}); " \
                      f"send a LoRA as diffusers' save_lora_weights writes it"
    if len(data) < _HEADER_SIZE.size:
        raise _error(not_safetensors, field)
    (length,) = _HEADER_SIZE.unpack_from(data)
    if length > len(data) - _HEADER_SIZE.size or length < 2:
        raise _error(not_safetensors, field)
    try:
        header = json.loads(bytes(data[_HEADER_SIZE.size: _HEADER_SIZE.size + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _error(not_safetensors, field) from error
    if not isinstance(header, dict):
        raise _error(not_safetensors, field)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(f"{FIELD} has a safetensors __metadata__ that is not an object of strings", field)
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) \
                or not isinstance(entry.get("dtype"), str):
            raise _error(f"{FIELD} is not a safetensors file: entry {show(key)} has no dtype and shape", field)
    if not header:
        raise _error(f"{FIELD} holds no tensors", field)
    return header, metadata


def _check_keys(
    header: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], field: str | None
) -> dict[str, tuple[str, str]]:
    """By module, the file's (down key, up key): every key a lora_A/lora_B of a UNet module
    this model fits LoRAs on, each module with both."""
    found: dict[str, dict[str, str]] = {}
    for key in header:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise _error(f"{FIELD} has the text-encoder key {show(key, 120)}; only UNet LoRAs are "
                         f"used (the morph fits and interpolates LoRAs on the UNet alone)", field)
        name = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
        module, _, part = name.rpartition(".lora_")
        part = "lora_" + part
        if part not in (f"{DOWN}.weight", f"{UP}.weight"):
            raise _error(f"{FIELD} has the unknown key {show(key, 120)}: expected "
                         f"[unet.]<module>.lora_A.weight / .lora_B.weight (peft/diffusers names)", field)
        if module not in shapes:
            raise _error(f"{FIELD} has the unknown key {show(key, 120)}: {show(module, 120)} is not an "
                         f"attention projection of this model's UNet (e.g. {name_list(sorted(shapes), 2, 80)})",
                         field)
        kind = part.split(".")[0]
        if kind in found.setdefault(module, {}):
            raise _error(f"{FIELD} has {module}.{kind} twice (with and without the unet. prefix)", field)
        found[module][kind] = key
    modules: dict[str, tuple[str, str]] = {}
    for module, parts in found.items():
        missing = DOWN if DOWN not in parts else UP if UP not in parts else None
        if missing:
            raise _error(f"{FIELD} has {show(module, 120)}'s {set(parts).pop()} but no {missing}", field)
        modules[module] = (parts[DOWN], parts[UP])
    return modules


def _check_shapes(
    header: Mapping[str, Any], modules: Mapping[str, tuple[str, str]], shapes: Mapping[str, tuple[int, int]],
    field: str | None, max_rank: int,
) -> int:
    """The LoRA's one rank, after checking each matrix's dtype and shape against its module:
    down (r, in_features), up (out_features, r), 1 <= r <= max_rank."""
    rank: int | None = None
    for module, (key_down, key_up) in sorted(modules.items()):
        in_features, out_features = shapes[module]
        for key in (key_down, key_up):
            if header[key]["dtype"] not in FLOAT_DTYPES:
                raise _error(f"{FIELD} has {show(key, 120)} of dtype {show(header[key]['dtype'])}; "
                             f"LoRA weights are {'/'.join(FLOAT_DTYPES)}", field)
        down, up = list(header[key_down]["shape"]), list(header[key_up]["shape"])
        if len(down) != 2 or down[1] != in_features:
            raise _error(f"{FIELD} has {show(key_down, 120)} of shape {down}; this model's {module} takes "
                         f"{in_features} features, so it must be [rank, {in_features}]", field)
        if len(up) != 2 or up[0] != out_features or up[1] != down[0]:
            raise _error(f"{FIELD} has {show(key_up, 120)} of shape {up}; with lora_A of rank {down[0]} and "
                         f"{out_features} output features it must be [{out_features}, {down[0]}]", field)
        if not 1 <= down[0] <= max_rank:
            raise _error(f"{FIELD} has rank {down[0]} in {show(key_down, 120)}; the rank must be between 1 "
                         f"and {max_rank} (limits.MAX_LORA_RANK)", field)
        if rank is not None and down[0] != rank:
            raise _error(f"{FIELD} has rank {down[0]} in {show(key_down, 120)} but rank {rank} elsewhere; "
                         f"one rank for every module", field)
        rank = down[0]
    assert rank is not None  # _read_header refused a file without tensors
    return rank


def _scaling(metadata: Mapping[str, str], rank: int, field: str | None) -> float:
    """lora_alpha / r from diffusers' adapter metadata (1 without it: alpha == rank, as ours),
    sqrt(r) in place of r for rsLoRA."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return 1.0
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise _error(f"{FIELD} has {METADATA_KEY} that is not JSON: {error}", field) from error
    if not isinstance(config, dict):
        raise _error(f"{FIELD} has {METADATA_KEY} that is not a JSON object", field)
    config = {k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k: v for k, v in config.items()}
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise _error(f"{FIELD} sets a per-module {pattern}; send one rank and alpha for every module", field)
    declared = config.get("r", rank)
    if declared != rank:
        raise _error(f"{FIELD} says r={show(declared)} in its metadata but its matrices have rank {rank}", field)
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _error(f"{FIELD} has lora_alpha {show(alpha)}; expected a finite number", field)
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
