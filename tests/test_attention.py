"""Attention processors: installed and restored, store/replace semantics on a real UNet."""

import pytest
import torch

from diffmorpher.attention import (
    MODE_REPLACE,
    MODE_STORE,
    AttentionStore,
    MorphAttnProcessor,
    MorphController,
    is_interpolated_layer,
    morph_attention,
)
from tests.tiny_sd import TEXT_DIM, tiny_components


@pytest.fixture(scope="module")
def unet():
    return tiny_components()["unet"].eval().requires_grad_(False)


def _inputs(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=generator),
        torch.tensor(300),
        torch.randn(batch, 77, TEXT_DIM, generator=generator),
    )


def test_processors_are_restored_after_the_morph_even_on_error(unet):
    originals = dict(unet.attn_processors)
    controller = MorphController(AttentionStore(2, num_steps=1))
    with morph_attention(unet, controller, None):
        assert all(isinstance(p, MorphAttnProcessor) for p in unet.attn_processors.values())
    assert unet.attn_processors == originals
    with pytest.raises(RuntimeError):
        with morph_attention(unet, controller, None):
            raise RuntimeError("boom")
    assert unet.attn_processors == originals


def test_processor_without_lora_or_store_matches_diffusers_attention(unet):
    inputs = _inputs(2)
    with torch.no_grad():
        reference = unet(*inputs).sample
        with morph_attention(unet, MorphController(AttentionStore(2, num_steps=0)), None):
            ours = unet(*inputs).sample
    assert (ours - reference).abs().max() < 1e-5


def test_only_up_block_self_attention_is_interpolated(unet):
    names = [n for n in unet.attn_processors if is_interpolated_layer(n)]
    assert names and all(n.startswith("up_blocks.") and ".attn1." in n for n in names)
    assert not any(is_interpolated_layer(n) for n in unet.attn_processors if ".attn2." in n)


def test_replace_with_endpoint_weights_reproduces_the_stored_pass(unet):
    """Replacing keys/values with image 0's own stored inputs changes nothing for image 0, while
    a 50/50 mix changes the output: the store and the mix are wired to the right layers."""
    latents, t, text = _inputs(2)
    store = AttentionStore(2, num_steps=1)
    controller = MorphController(store)
    with torch.no_grad(), morph_attention(unet, controller, None):
        controller.mode, controller.step, controller.image_indices = MODE_STORE, 0, [0, 1]
        stored_pass = unet(latents, t, text).sample
        assert store.nbytes > 0 and {layer for layer, _ in store.tensors} == {
            n[: -len(".processor")] for n in unet.attn_processors if is_interpolated_layer(n)
        }
        controller.mode, controller.image_indices = MODE_REPLACE, None
        controller.weights = torch.tensor([[1.0, 0.0]])
        same = unet(latents[:1], t, text[:1]).sample
        controller.weights = torch.tensor([[0.5, 0.5]])
        mixed = unet(latents[:1], t, text[:1]).sample
        controller.step = 1  # past the replaced steps: plain self-attention again
        plain = unet(latents[:1], t, text[:1]).sample
    assert (same[0] - stored_pass[0]).abs().max() < 1e-5
    assert (mixed[0] - stored_pass[0]).abs().max() > 1e-4
    assert (plain[0] - stored_pass[0]).abs().max() < 1e-5


def test_endpoints_in_the_same_batch_as_the_frames_store_before_the_frames_read(unet):
    """One call with rows [image 0, image 1, frame]: the endpoints' outputs and the frame's equal
    those of a store call followed by a replace call (what the pipeline did in two passes)."""
    latents, t, text = _inputs(3)
    weights = torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        separate = MorphController(AttentionStore(2, num_steps=1))
        with morph_attention(unet, separate, None):
            separate.mode, separate.image_indices = MODE_STORE, [0, 1]
            endpoints = unet(latents[:2], t, text[:2]).sample
            separate.mode, separate.image_indices, separate.weights = MODE_REPLACE, None, weights
            frame = unet(latents[2:], t, text[2:]).sample
        together = MorphController(AttentionStore(2, num_steps=1))
        with morph_attention(unet, together, None):
            together.mode, together.image_indices, together.weights = MODE_REPLACE, [0, 1], weights
            both = unet(latents, t, text).sample
    assert (both[:2] - endpoints).abs().max() < 1e-5
    assert (both[2:] - frame).abs().max() < 1e-5
    assert (frame - unet(latents[2:], t, text[2:]).sample).abs().max() > 1e-4  # the mix mattered
