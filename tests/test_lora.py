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


def test_fitting_images_together_matches_fitting_each_alone(tiny_sd_dir) -> None:
    """K LoRAs fitted in one UNet call per step (the trainer the pipeline runs) equal K fits of
    one image each: same losses step by step and the same weights (fp32; float error only)."""
    from diffmorpher.lora import fit_loras
    from diffmorpher.pipeline import DiffMorpherPipeline

    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")
    images = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 160, 0))]
    text = pipe.encode_prompts(["a red", "a blue", "a green"])
    mean, std = pipe.encode_images(images, 16)
    config = MorphConfig(lora_steps=4, lora_rank=4, lora_lr=1e-3)
    alone_losses, alone = [], []
    for k in range(3):
        losses = []
        alone += fit_loras(pipe.models.unet, pipe.models.schedule, mean[k : k + 1], std[k : k + 1], text.select([k]),
                           config, seed=0, on_step=lambda s, t, loss: losses.append(float(loss)))
        alone_losses.append(losses)
    together_losses = []
    together = fit_loras(pipe.models.unet, pipe.models.schedule, mean, std, text, config, seed=0,
                         on_step=lambda s, t, losses: together_losses.append(losses.tolist()))
    assert torch.allclose(torch.tensor(together_losses).T, torch.tensor(alone_losses), rtol=1e-4)
    for one, many in zip(alone, together):
        assert one.keys() == many.keys()
        # Adam moves each weight by ~lr per step (4e-3 in all here): float noise in the
        # gradients shows as ~1e-5, a wrong gradient as ~1e-3.
        assert max((one[key] - many[key]).abs().max().item() for key in one) < 1e-4
        # peft starts every up matrix at zero; four Adam steps move each entry by up to 4e-3.
        moved = max(one[key].abs().max().item() for key in one if ".lora_B." in key)
        assert 1e-4 < moved <= 4.1e-3, moved
    assert not any("lora" in name for name, _ in pipe.models.unet.named_parameters())
