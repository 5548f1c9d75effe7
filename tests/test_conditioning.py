"""Prompt conditioning: row arithmetic with numbers, the SD 1.x/2.x conditioner, and an
SDXL-shaped conditioning (pooled embeddings, time ids) through a UNet that needs them."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffmorpher.attention import MODE_REPLACE, AttentionStore, MorphController, morph_attention
from diffmorpher.conditioning import PromptConditioning, StableDiffusionConditioner, cat
from diffmorpher.models import load_morph_models


def _sdxl_shaped(count: int = 2) -> PromptConditioning:
    """K rows of sequence embeddings, pooled embeddings and (equal) time ids."""
    generator = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(count, 1)
    return PromptConditioning(
        torch.randn(count, 5, 16, generator=generator),
        {"text_embeds": torch.randn(count, 12, generator=generator), "time_ids": time_ids},
    )


def test_mix_weights_the_rows() -> None:
    prompts = PromptConditioning(torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]], [[-1.0, 0.0]]]))
    mixed = prompts.mix(torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    assert mixed.encoder_hidden_states.tolist() == [[[1.5, 3.0]], [[1.0, 3.0]], [[1.0, 2.0]]]
    assert mixed.added_cond_kwargs is None


def test_lerp_is_the_papers_text_interpolation() -> None:
    prompts = _sdxl_shaped()
    first, second = prompts.select([0]), prompts.select([1])
    path = first.lerp(second, torch.tensor([0.0, 0.25, 1.0]))
    assert len(path) == 3
    expected = 0.75 * prompts.encoder_hidden_states[0] + 0.25 * prompts.encoder_hidden_states[1]
    assert torch.allclose(path.encoder_hidden_states[1], expected, atol=1e-6)
    assert torch.equal(path.encoder_hidden_states[0], prompts.encoder_hidden_states[0])
    assert torch.equal(path.encoder_hidden_states[2], prompts.encoder_hidden_states[1])
    added = path.added_cond_kwargs
    assert added is not None
    pooled = prompts.added_cond_kwargs["text_embeds"]  # type: ignore[index]
    assert torch.allclose(added["text_embeds"][1], 0.75 * pooled[0] + 0.25 * pooled[1], atol=1e-6)
    assert torch.allclose(added["time_ids"], torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(3, 1))


def test_select_and_cat_build_a_batch() -> None:
    prompts = _sdxl_shaped(3)
    batch = cat([prompts.select([2, 0]), prompts.mix(torch.tensor([[0.0, 1.0, 0.0]]))])
    assert len(batch) == 3
    assert torch.equal(batch.encoder_hidden_states[0], prompts.encoder_hidden_states[2])
    assert torch.equal(batch.encoder_hidden_states[1], prompts.encoder_hidden_states[0])
    assert torch.equal(batch.encoder_hidden_states[2], prompts.encoder_hidden_states[1])
    assert batch.added_cond_kwargs is not None and batch.added_cond_kwargs["text_embeds"].shape == (3, 12)
    assert set(batch.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(PromptConditioning(prompts.encoder_hidden_states).unet_kwargs()) == {"encoder_hidden_states"}


def test_stable_diffusion_conditioner_encodes_the_clip_last_hidden_state(tiny_sd_dir) -> None:
    models = load_morph_models(tiny_sd_dir, torch.device("cpu"))
    conditioner = models.conditioner
    assert isinstance(conditioner, StableDiffusionConditioner)
    encoded = conditioner.encode(["a red", "a blue"], 16)
    tokens = conditioner.tokenizer(["a red", "a blue"], padding="max_length", truncation=True,
                                   max_length=conditioner.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encoded.encoder_hidden_states, conditioner.text_encoder(tokens).last_hidden_state)
    assert encoded.added_cond_kwargs is None and encoded.encoder_hidden_states.shape[:2] == (2, 77)
    assert conditioner.encoders == (conditioner.text_encoder,)


def test_a_unet_with_added_conditioning_runs_a_morph_batch_through_the_seam() -> None:
    """An SDXL-style UNet (addition_embed_type "text_time") takes a batch of endpoint and
    frame rows through `unet_kwargs`, with the morph's attention processors installed: the
    stages need nothing family-specific beyond the conditioning."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4,
    ).eval()
    prompts = _sdxl_shaped()
    rows = cat([prompts.select([0, 1]), prompts.mix(torch.tensor([[0.5, 0.5]]))])
    controller = MorphController(AttentionStore(2, 1), mode=MODE_REPLACE, weights=torch.tensor([[0.5, 0.5]]),
                                 image_indices=[0, 1])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), morph_attention(unet, controller, None):
        out = unet(latents, torch.tensor(500), **rows.unet_kwargs()).sample
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    assert controller.store.tensors  # the endpoints' rows were stored, the frame row read them
    with pytest.raises((TypeError, ValueError, AttributeError)):
        unet(latents, torch.tensor(500), encoder_hidden_states=rows.encoder_hidden_states)
