"""The model card (README.md) of the trained folder, filled from the training run's numbers."""

from __future__ import annotations

from pathlib import Path

from .architecture import LATENT_SIZE, TEXT_HIDDEN, UNET_CHANNELS, UNET_NORM_GROUPS, VAE_CHANNELS
from .dataset import BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, RESOLUTION, SHAPES


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _blend_lines(stats: dict) -> str:
    """The blend-scene training (embedded_model/blends.py) and any continued UNet steps, when
    the folder had them; nothing for a folder trained on pure scenes in one run."""
    lines = ""
    if stats.get("unet_continued_steps"):
        lines += (f"\n- Continued (continue-unet, from the EMA weights): "
                  f"{stats['unet_continued_steps']} more steps, {stats['unet_continued_seconds']} s.")
    if stats.get("blend_fraction"):
        lines += (f"\n- Blend scenes: {stats['blend_fraction']:g} of each UNet batch from "
                  f"{stats['blend_images']} blends of two training scenes at a random t (shapes "
                  f"mixed as signed-distance fields, colours in OKLCh along the shorter hue arc, "
                  f"position and size lerped; `embedded_model/blends.py`), conditioned on the "
                  f"lerp at t of the two captions' text-encoder outputs; generated and encoded "
                  f"in {stats['blend_seconds']} s.")
    return lines


def _colour_lerp_line(stats: dict) -> str:
    """The VAE's latent-interpolation loss (train_vae.ColourLerpData), when it had one."""
    if not stats.get("vae_colour_lerp"):
        return ""
    return (f"\n  Plus the latent-interpolation loss on {stats['vae_colour_lerp']} colour triplets "
            f"(one geometry in two colours and their OKLCh blend at t): decode(lerp(E(a), E(b), t)) "
            f"and decode(E(blend)) must both draw the blend, so the points between two latents "
            f"decode to colours between them (kept up in the decoder refinement).")


def write_model_card(out: Path, stats: dict) -> None:
    held_out = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT_PAIRS))
    guidance = "\n".join(
        f"| {key.removeprefix('held_out_pass_guidance_')} | {value} |"
        for key, value in stats.items() if key.startswith("held_out_pass_guidance_")
    ) or "| (not evaluated) | |"
    before = (f" ({stats['vae_psnr_before_refinement_db']} dB before the decoder refinement)"
              if "vae_psnr_before_refinement_db" in stats else "")
    text_to_image = stats.get("held_out_pass_guidance_5", "0/20")
    status = "" if int(text_to_image.split("/")[0]) >= 16 else (
        "## Status: undertrained\n"
        "Held-out prompts with guidance 5 pass below the issue's 16/20 bar: colour and shape\n"
        "follow the prompt only loosely. More UNet steps (`python -m embedded_model\n"
        "continue-unet`) are the known remedy.\n"
    )
    text = f"""# tiny-shapes-sd — the project's embedded Stable Diffusion model

A small text-to-image model in the exact diffusers `StableDiffusionPipeline` format, trained
by this repository's own code (`embedded_model/`) on images it draws. It exists so that the
morph service, its tests and its demo run with meaningful images where no model hub is
reachable. It is not a general image model: it draws one coloured shape on a plain background.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("models/tiny-shapes-sd", safety_checker=None)
    image = pipe("a red circle on a white background", num_inference_steps=25,
                 guidance_scale=5.0).images[0]

## Architecture (standard classes, SD 1.x layout, small sizes, one documented addition)
- Resolution {RESOLUTION}x{RESOLUTION}. `AutoencoderKL` with block_out_channels {VAE_CHANNELS}
  (scale factor {2 ** (len(VAE_CHANNELS) - 1)}): latents {LATENT_SIZE}x{LATENT_SIZE}x4,
  scaling_factor {stats['scaling_factor']:.5f} (1 / std of the training latents, as SD's 0.18215).
  64px with a 4x VAE rather than 128px with SD's 8x VAE: the 12x compression keeps shape edges
  sharp (PSNR below) and costs a quarter of the compute, which fits the 2-core CPU budget.
- `UNet2DConditionModel`: block_out_channels {UNET_CHANNELS}, CrossAttnDownBlock2D x2 + DownBlock2D,
  UpBlock2D + CrossAttnUpBlock2D x2, one layer per block, cross_attention_dim {TEXT_HIDDEN},
  {UNET_NORM_GROUPS} GroupNorm groups (SD's 32 would be one channel per group at {UNET_CHANNELS[0]}
  channels: an instance norm that erases the time embedding). The
  up blocks have SD's `attn1` (self) / `attn2` (cross) attention with to_q/to_k/to_v/to_out.0,
  which the morph's attention processors and LoRA use. One addition to SD 1.x: diffusers'
  `addition_embed_type="text"` (as in DeepFloyd IF's UNet), an attention-pooled prompt summary
  added to the time embedding (keys `add_embedding.*`). It needs no extra pipeline input, so
  `StableDiffusionPipeline` runs it unchanged; it exists because global attributes (shape
  colour, background) did not follow the prompt within the CPU budget through cross-attention
  alone. A converter to the original single-file SD 1.x format would have to drop it.
- `CLIPTextModel`: 2 layers, hidden size {TEXT_HIDDEN}, the full 49,408-token CLIP vocabulary;
  weights keyed `text_model.*` as in SD checkpoints. `CLIPTokenizer`: the real CLIP BPE
  (vocab.json + merges.txt, from the MIT-licensed open_clip_torch wheel), max length 77.
- `DDIMScheduler`: SD's scaled_linear betas 0.00085..0.012, 1000 steps, epsilon prediction.
- Weights stored as fp16 safetensors ({_size_mb(out):.1f} MB for the whole folder); load with
  `torch_dtype=torch.float32` on CPU.

## Data
Procedural (`embedded_model/dataset.py`, seed {stats['seed']}, {stats['images']} images): one
shape ({", ".join(SHAPES)}) in one colour ({", ".join(COLOURS)}) on a plain background
({", ".join(BACKGROUNDS)}), random size and position, captions like "a red circle on a white
background". Held out of training (never in a caption): {held_out}; the evaluation asks for
exactly these pairs on every background (20 prompts).

## Training
    {stats['command']}

Seed {stats['seed']}, {stats['threads']} CPU thread(s), torch {stats['torch']}.
- VAE: {stats['vae_steps']} steps x batch {stats['vae_batch']} (pixel MSE + 1e-6 KL; random
  32x32 crops, the last 10% on full images), {stats['vae_seconds']} s. Final MSE (in [-1, 1]
  units) {stats['vae_final_mse']}.{_colour_lerp_line(stats)}
- Latents precomputed: {stats['latent_seconds']} s.
- UNet + text encoder (jointly, 10% empty captions, Min-SNR-5 weighting, offset noise 0.1,
  EMA 0.998):
  {stats['unet_steps']} steps x batch {stats['unet_batch']}, {stats['unet_seconds']} s. Final
  epsilon MSE {stats['unet_final_eps_mse']}.{_blend_lines(stats)}
- VAE decoder refinement (encoder frozen, so the UNet's latents are unchanged; whole images):
  {stats.get('decoder_steps', 0)} steps x batch 16, {stats.get('decoder_seconds', 0)} s. Final MSE
  {stats.get('decoder_final_mse', '-')}.
- Total wall time {stats['total_train_seconds']} s ({stats['total_train_seconds'] / 60:.1f} min),
  on a 2-core CPU machine.

## Metrics
- VAE round trip of 256 fresh dataset images (seed {stats['seed'] + 1}): PSNR
  {stats['vae_psnr_db']} dB{before}.
- Held-out colour/shape prompts (25 DDIM steps; foreground colour and shape checked by
  `embedded_model/evaluate.py`):

| guidance scale | pass |
| --- | --- |
{guidance}

The issue's bar (16/20) is for text-to-image use, with classifier-free guidance. Guidance 1
is what the morph uses (no classifier-free guidance); morph frames start from inverted
images, not from noise, so they do not depend on the model drawing well unguided.

{status}
## Using real Stable Diffusion instead
Any local SD 1.x/2.x diffusers folder (epsilon or v-prediction; SD 1.5, SD 2.1-base, ...) works
wherever this folder does: fetch one on a machine that reaches a model hub (for example with
`hf download <repo id> --local-dir <folder>`), copy the folder over, and give its path where
`models/tiny-shapes-sd` is the default (the export step's model input, the core's
`load_morph_models(path, ...)`). A hub id also works where a hub is reachable. The resolution
follows the checkpoint (512 for SD 1.5 / 2.1-base).
"""
    (out / "README.md").write_text(text)
