"""Loading a Stable Diffusion checkpoint (diffusers folder layout) into the parts the morph uses.

What differs between model families (how prompts become UNet conditioning) is the `conditioner`
(conditioning.py), chosen here from the folder's components; the rest of the morph sees only it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .conditioning import StableDiffusionConditioner, StableDiffusionXLConditioner, TextConditioner
from .ddim import NoiseSchedule
from .families import SD, SDXL, ModelFamily, detect_family

logger = logging.getLogger(__name__)


@dataclass
class MorphModels:
    """The frozen components of a diffusion pipeline, on one device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    conditioner: TextConditioner  # prompts -> UNet conditioning, for this model family
    scheduler: DDIMScheduler  # always DDIM, built from the checkpoint's scheduler config
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    schedule: NoiseSchedule | None = None  # the scheduler's numbers, read once (filled in if None)

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = NoiseSchedule.from_scheduler(self.scheduler)

    @cached_property
    def identity(self) -> str:
        """What identifies these weights in cache keys, wherever they were unpacked: the dtype,
        the component configs, and for a local folder the SHA-256 of every weight file (read
        once; a few seconds for SD, where the page cache already holds the files). A path or
        a modification time would change with every unpacked copy of the same archive."""
        digest = hashlib.sha256(str(self.dtype).encode())
        for module in (self.unet, self.vae, *self.conditioner.encoders):
            config = module.config  # diffusers: a FrozenDict; transformers: a PretrainedConfig
            fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            fields = {k: v for k, v in fields.items() if k not in ("_name_or_path", "_diffusers_version")}
            digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
        folder = Path(self.source)
        weights = sorted(folder.glob("*/*.safetensors")) + sorted(folder.glob("*/*.bin")) if folder.is_dir() else []
        for path in weights:
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as stream:
                while chunk := stream.read(8 << 20):
                    digest.update(chunk)
        if not weights:  # a hub id or an in-memory model: its name is all there is
            digest.update(self.source.encode())
        return digest.hexdigest()[:32]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)


def load_morph_models(
    source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> MorphModels:
    """Load from a local diffusers folder (or a hub id where a hub is reachable).

    The checkpoint's own scheduler class is replaced by DDIM built from its config: inversion
    and sampling must use the same deterministic DDIM steps (the authors' code silently
    sampled with PNDM for SD 2.1-base).
    """
    source = str(source)
    local = Path(source)
    family = detect_family(local) if local.exists() else _hub_family(source)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    vae_config = AutoencoderKL.load_config(source, subfolder="vae")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype(vae_config, dtype))
    conditioner = _load_conditioner(family, source, device, dtype)
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    for module in (unet, vae, *conditioner.encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    logger.info(
        "loaded %s on %s (%s), prediction_type=%s",
        source, device, dtype, scheduler.config.prediction_type,
    )
    return MorphModels(unet, vae, conditioner, scheduler, device, dtype, source)


def vae_dtype(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: float32 where its config asks for an upcast (`force_upcast`, SDXL's VAE,
    which overflows in float16) and the run is float16; else the run dtype. The pipeline feeds
    the VAE in its own dtype and returns latents in the run dtype."""
    if dtype == torch.float16 and vae_config.get("force_upcast", False):
        return torch.float32
    return dtype


def _hub_family(source: str) -> ModelFamily:
    """A hub id (where a hub is reachable): SDXL where its UNet config says text_time."""
    config = UNet2DConditionModel.load_config(source, subfolder="unet")
    return SDXL if config.get("addition_embed_type") == "text_time" else SD


def _load_conditioner(family: ModelFamily, source: str, device: torch.device, dtype: torch.dtype) -> TextConditioner:
    """The family's prompt encoder: SD 1.x/2.x's one CLIP text encoder, SDXL's two."""
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    if family is SD:
        return StableDiffusionConditioner(tokenizer, text_encoder, device, dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", torch_dtype=dtype)
    tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
    return StableDiffusionXLConditioner((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), device, dtype)
