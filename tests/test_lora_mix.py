"""Per-sample LoRA mixing in the morph's attention processors against peft's own LoRA layers."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict

from diffmorpher.attention import AttentionStore, MorphController, morph_attention
from diffmorpher.config import LORA_TARGET_MODULES, ConfigError
from diffmorpher.interpolation import interpolate_lora
from diffmorpher.lora_mix import build_lora_stacks
from tests.tiny_sd import TEXT_DIM, tiny_components

RANK = 4


@pytest.fixture(scope="module")
def unet():
    return tiny_components()["unet"].eval().requires_grad_(False)


def _random_lora(unet, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA with peft's key layout and non-zero up matrices (peft initialises them to 0)."""
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(LORA_TARGET_MODULES)))
    from peft.utils import get_peft_model_state_dict

    keys = get_peft_model_state_dict(unet)
    unet.unload_lora()
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in keys.items()}


def _peft_output(unet, lora, inputs):
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(LORA_TARGET_MODULES)))
    set_peft_model_state_dict(unet, lora)
    try:
        return unet(*inputs).sample
    finally:
        unet.unload_lora()


def _inputs(batch: int = 1):
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, TEXT_DIM, generator=generator)
    return latents, torch.tensor(500), text


def _mixed_output(unet, loras, weights, inputs):
    controller = MorphController(AttentionStore(len(loras), num_steps=0))
    controller.lora_weights = weights
    with morph_attention(unet, controller, build_lora_stacks(loras, torch.device("cpu"), torch.float32)):
        return unet(*inputs).sample


def test_lora_mix_at_0_and_1_equals_peft_with_lora0_and_lora1(unet):
    lora0, lora1 = _random_lora(unet, 0), _random_lora(unet, 1)
    inputs = _inputs()
    with torch.no_grad():
        ours0 = _mixed_output(unet, [lora0, lora1], torch.tensor([[1.0, 0.0]]), inputs)
        ours1 = _mixed_output(unet, [lora0, lora1], torch.tensor([[0.0, 1.0]]), inputs)
        ref0 = _peft_output(unet, lora0, inputs)
        ref1 = _peft_output(unet, lora1, inputs)
        base = unet(*inputs).sample
    assert (ref0 - base).abs().max() > 1e-2  # the LoRA does change the output
    assert (ours0 - ref0).abs().max() < 1e-6
    assert (ours1 - ref1).abs().max() < 1e-6


def test_lora_mix_equals_the_papers_weight_lerp(unet):
    lora0, lora1 = _random_lora(unet, 0), _random_lora(unet, 1)
    inputs = _inputs()
    with torch.no_grad():
        ours = _mixed_output(unet, [lora0, lora1], torch.tensor([[0.7, 0.3]]), inputs)
        ref = _peft_output(unet, interpolate_lora(lora0, lora1, 0.3), inputs)
    assert (ours - ref).abs().max() < 1e-5


def test_each_sample_of_a_batch_gets_its_own_mix(unet):
    loras = [_random_lora(unet, 0), _random_lora(unet, 1)]
    weights = torch.tensor([[1.0, 0.0], [0.4, 0.6], [0.0, 1.0]])
    latents, t, text = _inputs(3)
    with torch.no_grad():
        batched = _mixed_output(unet, loras, weights, (latents, t, text))
        for i in range(3):
            single = _mixed_output(unet, loras, weights[i : i + 1], (latents[i : i + 1], t, text[i : i + 1]))
            assert (batched[i] - single[0]).abs().max() < 1e-5


def test_mismatched_loras_are_rejected(unet):
    lora0 = _random_lora(unet, 0)
    lora1 = dict(list(lora0.items())[:-2])
    with pytest.raises(ConfigError, match="same parameters"):
        build_lora_stacks([lora0, lora1], torch.device("cpu"), torch.float32)
