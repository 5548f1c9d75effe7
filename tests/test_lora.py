import pytest
import torch
from PIL import Image

from diffmorpher.config import MorphConfig
from diffmorpher.lora import lora_cache_key


def test_lora_cache_key_changes_with_content_and_hyperparameters():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    config = MorphConfig()
    key = lora_cache_key(red, "a red square", "model-a", config, 16)
    assert key == lora_cache_key(red.copy(), "a red square", "model-a", config, 16)
    assert key != lora_cache_key(blue, "a red square", "model-a", config, 16)
    assert key != lora_cache_key(red, "a blue square", "model-a", config, 16)
    assert key != lora_cache_key(red, "a red square", "model-b", config, 16)
    assert key != lora_cache_key(red, "a red square", "model-a", config.replace(lora_steps=10), 16)
    # Options that do not change the LoRA keep the key (frames, reschedule, ...).
    assert key == lora_cache_key(red, "a red square", "model-a", config.replace(num_frames=5), 16)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_noising_matches_diffusers_and_leaves_the_scheduler_alone(prediction_type: str) -> None:
    from diffusers import DDIMScheduler

    from diffmorpher.lora import ForwardNoising

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timestep = torch.tensor([17, 901])
    noisy, target = ForwardNoising(scheduler, torch.device("cpu"))(latents, noise, timestep)
    reference = DDIMScheduler.from_config(scheduler.config)
    assert torch.allclose(noisy, reference.add_noise(latents, noise, timestep), atol=1e-6)
    expected = reference.get_velocity(latents, noise, timestep) if prediction_type == "v_prediction" else noise
    assert torch.allclose(target, expected, atol=1e-6)
