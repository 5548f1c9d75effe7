"""Which model family a diffusers folder holds, decided in one place for the loader and the export.

Supported: SD 1.x/2.x (`StableDiffusionPipeline`: one CLIP text encoder) and SDXL base
(`StableDiffusionXLPipeline`: two text encoders, a UNet with `addition_embed_type="text_time"`).
Anything else (an SDXL refiner, SD3/Flux with a `transformer/`, an unknown pipeline class) is
refused with a ConfigError that names what was found and what is supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd" or "sdxl"
    pipeline_class: str  # model_index.json's _class_name for this family
    subfolders: tuple[str, ...]  # the parts the morph loads (and the export copies)


SD = ModelFamily("sd", "StableDiffusionPipeline", ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
SDXL = ModelFamily(
    "sdxl", "StableDiffusionXLPipeline",
    ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
)
FAMILIES = (SD, SDXL)
# SD 1.x/2.x UNets take no added conditioning (None) or derive it from the text states ("text").
SD_ADDITION_EMBED_TYPES = (None, "text")
SUPPORTED = "supported: StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline (SDXL base)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not readable JSON: {error}") from error
    return data if isinstance(data, dict) else {}


def detect_family(folder: str | Path) -> ModelFamily:
    """The family of a local diffusers folder, from its model_index.json class (where present),
    its subfolders and its UNet config; ConfigError naming what was found otherwise."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    class_name = index.get("_class_name")
    known = {family.pipeline_class for family in FAMILIES}
    if class_name is not None and class_name not in known:
        raise ConfigError(f"{folder}: found a {class_name} folder; {SUPPORTED}")
    if not (folder / "unet").is_dir():
        found = "a transformer/ (an SD3/Flux-style DiT)" if (folder / "transformer").is_dir() else "no unet/"
        raise ConfigError(f"{folder}: found {found}, not a diffusers Stable Diffusion folder; {SUPPORTED}")
    unet_config = folder / "unet" / "config.json"
    unet = _read_json(unet_config) if unet_config.is_file() else {}
    addition = unet.get("addition_embed_type")
    has_first, has_second = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if has_second or addition == "text_time" or class_name == SDXL.pipeline_class:
        if not has_first or unet.get("requires_aesthetics_score") or index.get("requires_aesthetics_score"):
            raise ConfigError(
                f"{folder}: found an SDXL refiner (no text_encoder/, aesthetics score); {SUPPORTED}"
            )
        if addition != "text_time" or not has_second:
            raise ConfigError(
                f"{folder}: found text_encoder_2/={has_second} with a UNet addition_embed_type={addition!r} "
                f"(SDXL needs both text_encoder_2/ and 'text_time'); {SUPPORTED}"
            )
        family = SDXL
    elif addition not in SD_ADDITION_EMBED_TYPES:  # image / text_image / image_hint: an adapter's inputs
        raise ConfigError(f"{folder}: found a UNet with addition_embed_type={addition!r}; {SUPPORTED}")
    else:
        family = SD
    if class_name is not None and class_name != family.pipeline_class:
        raise ConfigError(
            f"{folder}: model_index.json names {class_name} but the parts are {family.pipeline_class}'s; {SUPPORTED}"
        )
    return family
