"""Write the trained parts as a standard Stable Diffusion diffusers folder.

Why by hand in places: the folder must load in every common stack, not only the one installed
here. transformers 5 would save the text encoder's weights without the `text_model.` prefix
(older stacks then load a random encoder, silently) and the tokenizer as tokenizer.json only;
so the text encoder's safetensors keys are written with SD's prefix and the tokenizer folder
holds vocab.json + merges.txt (see tokenizer.py). Weights are stored as fp16 to stay small;
loaders upcast to the torch_dtype they are asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

WEIGHTS_DTYPE = torch.float16
TEXT_PREFIX = "text_model."


def model_index() -> dict:
    """SD 1.x's model_index.json, without safety checker / feature extractor."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def text_encoder_state_dict(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Weights keyed as in SD checkpoints: `text_model.embeddings.token_embedding.weight`, ..."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a buffer, rebuilt by every version
        name = key if key.startswith(TEXT_PREFIX) else TEXT_PREFIX + key
        out[name] = value.detach().to(WEIGHTS_DTYPE).contiguous()
    return out


def save_text_encoder(text_encoder: CLIPTextModel, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.config.architectures = ["CLIPTextModel"]
    text_encoder.config.save_pretrained(folder)
    # The weights are fp16 on disk; say float32 as SD's own config does, so a loader given no
    # dtype (transformers 5 then follows the config) builds the encoder in the UNet's dtype.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(text_encoder_state_dict(text_encoder), folder / "model.safetensors",
              metadata={"format": "pt"})


def save_pipeline(
    out: Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler: DDIMScheduler,
) -> None:
    """Save the model parts into `out` (whose tokenizer/ is written by tokenizer.py)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("unet", unet), ("vae", vae)):
        model.to(WEIGHTS_DTYPE).save_pretrained(out / name, safe_serialization=True)
        model.to(torch.float32)
    save_text_encoder(text_encoder, out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
