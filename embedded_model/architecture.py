"""Configuration of the embedded model: the standard SD classes, shrunk to train on 2 CPU cores.

Why these sizes (see models/tiny-shapes-sd/README.md for the measurements):
- 64x64 images and a VAE with 3 resolution levels (scale factor 4): 16x16x4 latents. That is a
  12x compression, which flat shapes survive with PSNR well above 26 dB, where SD's 8x VAE at
  128px (48x) blurs the edges and costs 4x the compute.
- The UNet keeps SD 1.x's block *types* (cross-attention down/up blocks with `attn1` self-
  and `attn2` cross-attention and `to_q/to_k/to_v/to_out.0` projections), so attention
  processors and LoRA of the morph service hook it exactly as they hook real SD.
- The text encoder is a 2-layer CLIPTextModel over the full 49,408-token CLIP vocabulary: its
  token embedding dominates its size, so the hidden size stays small (64).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .dataset import RESOLUTION
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE

TEXT_HIDDEN = 64
VAE_CHANNELS: tuple[int, ...] = (16, 32, 64)
LATENT_CHANNELS = 4
VAE_SCALE = 2 ** (len(VAE_CHANNELS) - 1)
LATENT_SIZE = RESOLUTION // VAE_SCALE
UNET_CHANNELS: tuple[int, ...] = (32, 64, 128)
# 8 groups: 4 channels per group at the first level (SD has 320 / 32 = 10). Why not SD's 32
# groups: at 32 channels that is one channel per group, an instance norm, which erases the
# per-channel time/text embedding that ResnetBlock2D adds just before norm2 and every
# per-channel mean: the first run drew shapes right but colours and backgrounds wrong.
UNET_NORM_GROUPS = 8


def make_vae() -> AutoencoderKL:
    """SD's AutoencoderKL with 3 levels instead of 4. The scaling factor is set after training
    from the latents' standard deviation, as SD's 0.18215 was."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=1.0,
    )


def make_unet() -> UNet2DConditionModel:
    """SD 1.x's UNet layout (cross-attention in the two outer levels, none in the innermost),
    one layer per block, plus diffusers' `addition_embed_type="text"`: an attention-pooled
    summary of the prompt added to the time embedding, so every ResNet block is modulated by it
    (DeepFloyd IF's UNet does the same). Why: colour and background are global attributes;
    learned only through cross-attention they did not come out right within the CPU training
    budget (backgrounds and colours drifted even for training prompts). The pipeline passes
    nothing extra, so StableDiffusionPipeline, LoRA and attention processors are unchanged."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=UNET_NORM_GROUPS,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def make_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_scheduler() -> DDIMScheduler:
    """SD 1.x/2.x-base's noise schedule (epsilon prediction, scaled_linear betas)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )
