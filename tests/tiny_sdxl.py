"""A tiny, randomly initialised SDXL-structured pipeline for unit tests (no download).

SDXL's classes and folder layout (two text encoders and tokenizers, a UNet with
`addition_embed_type="text_time"`, several transformer layers per block, an UpBlock2D as the
last up block, a VAE with `force_upcast`), a few thousand times
smaller. The tokenizers are the real CLIP BPE files of the embedded model, the VAE is its trained one; the UNet and
text encoders are random, so frames between the endpoints are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "tiny-shapes-sd"
TOKENIZER_DIR, EMBEDDED_VAE_DIR = EMBEDDED / "tokenizer", EMBEDDED / "vae"
TEXT_DIM, TEXT_DIM_2, POOLED_DIM, TIME_DIM = 16, 32, 24, 8


def _text_config(tokenizer: CLIPTokenizer, hidden: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")  # SDXL's second pads with "!"
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM,
    )
    # The embedded model's trained VAE (scale factor 4, its own scaling factor, force_upcast as
    # SDXL's): random VAEs decode any latent to about the same image, a trained one lets tests
    # check that endpoint frames reconstruct their inputs.
    vae = AutoencoderKL.from_pretrained(EMBEDDED_VAE_DIR)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_DIM_2, projection_dim=POOLED_DIM))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "scheduler": scheduler,
    }


def save_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a diffusers SDXL folder (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    path = Path(path)
    for name, component in tiny_sdxl_components(seed).items():
        component.save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "force_zeros_for_empty_prompt": True,
    }, indent=2))
    return path
