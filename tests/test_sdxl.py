"""SDXL as a second model family, on the tiny random SDXL folder (tests/tiny_sdxl.py): its
conditioning, a whole morph (LoRA fitting, inversion, frames with attention replacement and
LoRA mixing, reschedule), the export of both encoders, the model identity and the fp16 VAE
upcast. The family check itself: tests/test_families.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmorpher import MorphConfig
from diffmorpher.conditioning import StableDiffusionXLConditioner
from diffmorpher.families import SDXL
from diffmorpher.models import load_morph_models, vae_dtype
from diffmorpher.pipeline import DiffMorpherPipeline
from export.build_mar import ExportError, check_sd_folder, copy_weights

FAST = dict(num_frames=5, lora_steps=2, lora_rank=4, num_inference_steps=4, perceptual_metric="pixel", seed=1)
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir: Path) -> DiffMorpherPipeline:
    return DiffMorpherPipeline.from_pretrained(tiny_sdxl_dir, device="cpu")


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (20, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]


def test_the_conditioning_is_both_encoders_penultimate_states_and_the_pooled_projection(pipe) -> None:
    conditioner = pipe.models.conditioner
    assert isinstance(conditioner, StableDiffusionXLConditioner)
    assert conditioner.encoders == conditioner.text_encoders and len(conditioner.encoders) == 2
    encoded = conditioner.encode(PROMPTS, 32)
    states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(conditioner.tokenizers, conditioner.text_encoders):
            tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
            output = encoder(tokens, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output.text_embeds if hasattr(output, "text_embeds") else None
    assert torch.equal(encoded.encoder_hidden_states, torch.cat(states, dim=-1))
    assert encoded.encoder_hidden_states.shape == (2, 77, pipe.models.unet.config.cross_attention_dim)
    assert encoded.added_cond_kwargs is not None and pooled is not None
    assert torch.equal(encoded.added_cond_kwargs["text_embeds"], pooled)
    assert encoded.added_cond_kwargs["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert not torch.allclose(pooled[0], pooled[1])  # two prompts, two pooled embeddings


def test_a_whole_morph_on_sdxl_interpolates_the_pooled_embeddings(pipe) -> None:
    """LoRA fitting, inversion, frames and reschedule: endpoints reconstruct their inputs (much
    closer than to the other input), alphas rise from 0 to 1, and each frame's UNet calls carry
    the lerp of the two prompts' pooled embeddings (and the equal time ids)."""
    seen: list[torch.Tensor] = []

    def spy(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["text_embeds"].detach().clone())

    handle = pipe.models.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = pipe(_images(), PROMPTS, MorphConfig(**FAST))
    finally:
        handle.remove()
    assert len(result.frames) == 5 and result.frame_tensors.shape == (5, 3, 32, 32)
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0 and result.alphas == sorted(result.alphas)
    assert len(result.loras) == 2 and all(lora and all(k.endswith(".weight") for k in lora) for lora in result.loras)
    assert any("up_blocks.0.attentions.1.transformer_blocks.1.attn1" in k for k in result.loras[0])
    assert result.perceptual_metric == "pixel-l2" and "reschedule" in result.timings

    # Endpoints: the VAE reconstruction of each input, through inversion and sampling.
    with torch.no_grad():
        mean, _ = pipe.encode_images(_images(), 32)
        reference = pipe.decode(mean)
    own = [(result.frame_tensors[i] - reference[j]).abs().mean().item() for i, j in ((0, 0), (-1, 1))]
    other = [(result.frame_tensors[i] - reference[j]).abs().mean().item() for i, j in ((0, 1), (-1, 0))]
    assert max(own) < 0.5 * min(other), (own, other)

    pooled = pipe.encode_prompts(PROMPTS, 16).added_cond_kwargs["text_embeds"]  # type: ignore[index]
    rows = torch.cat(seen)
    middle = result.alphas[2]
    assert 0 < middle < 1
    expected = (1 - middle) * pooled[0] + middle * pooled[1]
    assert (rows - expected).abs().amax(dim=1).min() < 1e-5  # some frame row is exactly that lerp


def test_the_export_copies_both_encoders_of_sdxl(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    assert check_sd_folder(tiny_sdxl_dir) is SDXL
    copy_weights(tiny_sdxl_dir, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted([*SDXL.subfolders, "model_index.json"])
    shutil.rmtree(tmp_path / "model" / "tokenizer_2")
    with pytest.raises(ExportError, match="tokenizer_2"):
        check_sd_folder(tmp_path / "model")


def test_the_identity_covers_both_text_encoders(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sdxl_dir, copy)
    first = load_morph_models(copy, torch.device("cpu")).identity
    encoder = load_morph_models(copy, torch.device("cpu")).conditioner.encoders[1]
    with torch.no_grad():
        encoder.text_projection.weight.add_(1.0)
    encoder.save_pretrained(copy / "text_encoder_2")
    assert load_morph_models(copy, torch.device("cpu")).identity != first


def test_a_float16_run_upcasts_a_force_upcast_vae(tiny_sdxl_dir: Path) -> None:
    """SDXL's VAE overflows in fp16: with `force_upcast` it stays float32 in a float16 run, fed
    and read in the run's dtype; other VAEs follow the run dtype."""
    assert vae_dtype({"force_upcast": True}, torch.float16) == torch.float32
    assert vae_dtype({"force_upcast": True}, torch.bfloat16) == torch.bfloat16
    assert vae_dtype({"force_upcast": False}, torch.float16) == torch.float16
    assert vae_dtype({}, torch.float32) == torch.float32
    models = load_morph_models(tiny_sdxl_dir, torch.device("cpu"), torch.float16)
    assert models.vae.dtype == torch.float32 and models.unet.dtype == torch.float16
    pipe = DiffMorpherPipeline(models, None)
    with torch.no_grad():
        mean, std = pipe.encode_images(_images(), 16)
        images = pipe.decode(mean)
    assert mean.dtype == std.dtype == torch.float16 and mean.shape == (2, 4, 4, 4)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
