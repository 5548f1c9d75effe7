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
