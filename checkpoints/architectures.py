"""The published architectures users serve, as config dictionaries (sizes only, no weights).

A random-weight model built from one of these has the real model's parameter count, memory and
time per UNet call, so the whole served path (export, load, LoRA fitting, inversion, frames) is
exercised at real size with no model hub; only the pictures are noise. The values are the
published `config.json` fields of each checkpoint's components (facts, not code):

- `sd15`: runwayml/stable-diffusion-v1-5 (CLIP ViT-L/14 text encoder), 512 px.
- `sd21-base`: stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H/14), 512 px, epsilon.
- `sd21`: stabilityai/stable-diffusion-2-1, the same UNet at 768 px, v-prediction.
- `sdxl-base`: stabilityai/stable-diffusion-xl-base-1.0 (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14,
  pooled text embeddings and time ids as added conditioning), 1024 px.

They live in the product because the export needs them: an original single-file checkpoint from
a hub carries weights only, so `checkpoints.convert` builds its diffusers folder from these
configs (benchmarks' random-weight models read the same ones). The tokenizer is the real CLIP
BPE of the embedded model (`TOKENIZER_DIR`); SD 2.x's and SDXL's OpenCLIP tokenizer is the same
BPE padding with "!" (`OPENCLIP_PAD_TOKEN`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-shapes-sd" / "tokenizer"
CLIP_PAD_TOKEN, OPENCLIP_PAD_TOKEN = "<|endoftext|>", "!"

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
}

SD15_UNET: dict[str, Any] = {
    **_UNET_COMMON, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "up_block_types": _SD_UP, "sample_size": 64,
}
SD21_UNET: dict[str, Any] = {
    **_UNET_COMMON, "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024, "down_block_types": _SD_DOWN, "up_block_types": _SD_UP, "sample_size": 64,
    "use_linear_projection": True,
}
SDXL_UNET: dict[str, Any] = {
    **_UNET_COMMON, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "sample_size": 128, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# transformers CLIPTextConfig fields.
CLIP_VIT_L: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}
OPENCLIP_VIT_H: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
    "projection_dim": 512, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}
OPENCLIP_VIT_BIGG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408,
}

# diffusers AutoencoderKL fields (SD's VAE; SDXL's differs in its scaling factor and upcast).
_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_VAE: dict[str, Any] = {**_VAE, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_VAE: dict[str, Any] = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# diffusers DDIM/PNDM scheduler fields shared by all four (SD 2.1 768 predicts v).
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Architecture:
    """One published checkpoint's components, by config."""

    name: str
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # SDXL: (CLIP ViT-L, OpenCLIP bigG with projection)
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    # How an original single file stores an SD text encoder: "clip" (SD 1.x's transformers CLIP)
    # or "openclip" (SD 2.x's OpenCLIP, fused q/k/v); SDXL's two are always CLIP then OpenCLIP.
    text_layout: str = "clip"

    @property
    def resolution(self) -> int:
        """Native pixel size: the UNet's latent size times the VAE's downsampling."""
        return int(self.unet["sample_size"]) * 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture("sd15", SD15_UNET, (CLIP_VIT_L,), SD_VAE),
    "sd21-base": Architecture("sd21-base", SD21_UNET, (OPENCLIP_VIT_H,), SD_VAE, text_layout="openclip"),
    "sd21": Architecture("sd21", {**SD21_UNET, "sample_size": 96}, (OPENCLIP_VIT_H,), {**SD_VAE, "sample_size": 768},
                         {**SCHEDULER, "prediction_type": "v_prediction"}, text_layout="openclip"),
    "sdxl-base": Architecture("sdxl-base", SDXL_UNET, (CLIP_VIT_L, OPENCLIP_VIT_BIGG), SDXL_VAE),
}
