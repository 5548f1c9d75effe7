"""Which family a diffusers folder holds: SD 1.x/2.x and SDXL base are recognised; anything else
is refused, at load and at export alike, with a message naming what was found and what is
supported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffmorpher import ConfigError
from diffmorpher.families import SD, SDXL, detect_family
from diffmorpher.models import load_morph_models
from export.build_mar import ExportError, check_sd_folder
from tests.conftest import EMBEDDED_MODEL


def _folder(root: Path, name: str, class_name: str | None, parts: dict[str, dict]) -> Path:
    folder = root / name
    folder.mkdir()
    if class_name:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for part, config in parts.items():
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_families_are_refused_at_load_and_at_export(tmp_path: Path, tiny_sd_dir, tiny_sdxl_dir) -> None:
    assert detect_family(tiny_sd_dir) is SD and detect_family(tiny_sdxl_dir) is SDXL
    assert detect_family(EMBEDDED_MODEL) is SD  # its UNet has addition_embed_type "text": still SD
    text_time = {"addition_embed_type": "text_time"}
    cases = {
        "FluxPipeline": _folder(tmp_path, "flux", "FluxPipeline", {"transformer": {}, "vae": {}}),
        "transformer/": _folder(tmp_path, "sd3", None, {"transformer": {}, "vae": {}}),
        "StableDiffusionXLImg2ImgPipeline": _folder(
            tmp_path, "refiner", "StableDiffusionXLImg2ImgPipeline", {"unet": text_time, "text_encoder_2": {}}),
        "refiner": _folder(tmp_path, "refiner-no-index", None, {"unet": text_time, "text_encoder_2": {}}),
        "addition_embed_type=None": _folder(tmp_path, "half-xl", None, {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}),
        "addition_embed_type='image'": _folder(tmp_path, "image-emb", None, {"unet": {"addition_embed_type": "image"}}),
    }
    for found, folder in cases.items():
        for error_type, call in ((ConfigError, lambda: load_morph_models(folder, torch.device("cpu"))),
                                 (ExportError, lambda: check_sd_folder(folder))):
            with pytest.raises(error_type) as raised:
                call()
            message = str(raised.value)
            assert found in message and "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message


