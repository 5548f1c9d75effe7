"""Diffusers folder -> one original-layout (LDM) .safetensors file, the project's own writer.

    python -m checkpoints.write_single_file --model models/tiny-shapes-sd --out tiny.safetensors

The file has the key names of the published single files (`checkpoints.keymap`), so other tools
that read original checkpoints read it too, and it carries the folder's component configs in its
header metadata (`checkpoints.spec.METADATA_KEY`), so `checkpoints.convert` gives back the same
folder for any size. An SD folder's text encoder is written as SD 1.x's CLIP, or as SD 2.x's
OpenCLIP (fused q/k/v) with `--text-layout openclip` (`auto`: OpenCLIP for a 1024-wide encoder,
SD 2.x's ViT-H).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from diffmorpher.config import ConfigError
from diffmorpher.families import SDXL as SDXL_FAMILY, detect_family

from .components import DIFFUSERS_WEIGHTS, TEXT_CLASSES, TRANSFORMERS_WEIGHTS, canonical_key, components
from .errors import CheckpointError
from .keymap import CLIP, OPENCLIP, to_original
from .spec import SD, SDXL, ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SD2_TEXT_WIDTH = 1024  # OpenCLIP ViT-H, SD 2.x's text encoder


def _config(folder: Path) -> dict[str, Any]:
    name = "config.json" if (folder / "config.json").is_file() else "scheduler_config.json"
    return json.loads((folder / name).read_text())


def folder_spec(model: Path, text_layout: str = "auto") -> ModelSpec:
    """The ModelSpec of a diffusers folder: its own configs and its tokenizers' pad tokens."""
    try:
        family = detect_family(model)
    except ConfigError as error:
        raise CheckpointError(str(error)) from error
    is_sdxl = family == SDXL_FAMILY
    encoders = ("text_encoder", "text_encoder_2") if is_sdxl else ("text_encoder",)
    tokenizers = ("tokenizer", "tokenizer_2") if is_sdxl else ("tokenizer",)
    text = tuple(_config(model / name) for name in encoders)
    if text_layout == "auto":
        text_layout = OPENCLIP if not is_sdxl and text[0]["hidden_size"] == SD2_TEXT_WIDTH else CLIP
    pads = tuple(str(CLIPTokenizer.from_pretrained(model / name).pad_token) for name in tokenizers)
    return ModelSpec(SDXL if is_sdxl else SD, _config(model / "unet"), _config(model / "vae"),
                     _config(model / "scheduler"), text, CLIP if is_sdxl else text_layout, pads)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A component's tensors as saved, dtype included: one safetensors file or a sharded set."""
    for name in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS):
        if (folder / name).is_file():
            return load_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {key: tensor for shard in shards for key, tensor in load_file(folder / shard).items()}
    raise CheckpointError(f"{folder}: no {DIFFUSERS_WEIGHTS} or {TRANSFORMERS_WEIGHTS} (safetensors weights)")


def load_states(model: Path, spec: ModelSpec, dtype: torch.dtype | None) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's state dict by folder name, in its saved dtype unless `dtype` is given."""
    states = {name: read_weights(model / name) for name in ("unet", "vae")}
    for slot in spec.slots():
        model_class = TEXT_CLASSES[slot.model_class]
        states[slot.folder] = {canonical_key(model_class, key): tensor
                               for key, tensor in read_weights(model / slot.folder).items()}
    if dtype is not None:
        states = {name: {key: tensor.to(dtype) for key, tensor in state.items()} for name, state in states.items()}
    return states


def original_state(model: Path, spec: ModelSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors under their original names."""
    states = load_states(model, spec, dtype)
    original: dict[str, torch.Tensor] = {}
    for part in components(spec):
        original.update(to_original(states[part.folder], part.where))
    return {key: tensor.contiguous() for key, tensor in original.items()}


def write_single_file(model: Path, out: Path, *, text_layout: str = "auto", dtype: torch.dtype | None = None) -> Path:
    spec = folder_spec(model, text_layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_state(model, spec, dtype), out, metadata=spec.to_metadata())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.write_single_file",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x/2.x or SDXL-base folder")
    parser.add_argument("--out", type=Path, required=True, help=".safetensors file to write")
    parser.add_argument("--text-layout", choices=("auto", CLIP, OPENCLIP), default="auto",
                        help="an SD folder's text encoder as SD 1.x CLIP or SD 2.x OpenCLIP keys")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as saved)")
    args = parser.parse_args(argv)
    try:
        write_single_file(args.model, args.out, text_layout=args.text_layout, dtype=DTYPES[args.dtype] if args.dtype else None)
    except CheckpointError as error:
        print(f"error: {error}")
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
