"""One image and K >= 2 prompts: the endpoints the service makes (diffmorpher/endpoints.py), on the
tiny random pipeline (structure, cache, reproducibility) and the embedded model (red -> blue)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffmorpher import ConfigError, MorphConfig
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.conditioning import PromptConditioning
from diffmorpher.endpoints import guided_predictor
from diffmorpher.lora_file import lora_to_safetensors
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.conftest import DEMO_DIR, EMBEDDED_MODEL

FAST = dict(num_frames=3, lora_steps=2, lora_rank=4, num_inference_steps=4, perceptual_metric="pixel")
PROMPTS = ["a red square", "a blue square", "a green square"]


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _LinearUnet:
    """A UNet stand-in whose output is the conditioning's mean per row: guidance is then
    arithmetic that a test can check."""

    def __call__(self, latents, timestep, encoder_hidden_states):
        out = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(latents)
        return type("Out", (), {"sample": out})()


def test_guidance_moves_the_prediction_away_from_the_unconditional_one():
    conditioned = PromptConditioning(torch.full((2, 3, 4), 2.0))
    unconditional = PromptConditioning(torch.full((1, 3, 4), 0.5))
    latents = torch.zeros(2, 4, 2, 2)
    guided = guided_predictor(_LinearUnet(), conditioned, unconditional, 5.0)(latents, torch.tensor(1), 0)
    plain = guided_predictor(_LinearUnet(), conditioned, unconditional, 1.0)(latents, torch.tensor(1), 0)
    assert guided.shape == latents.shape
    assert torch.allclose(guided, torch.full_like(latents, 0.5 + 5.0 * (2.0 - 0.5)))  # u + g (c - u) = 8
    assert torch.allclose(plain, torch.full_like(latents, 2.0))


def test_one_image_and_three_prompts_morph_through_two_made_endpoints(pipe):
    image = Image.new("RGB", (24, 16), (255, 0, 0))
    result = pipe([image], PROMPTS, MorphConfig(**FAST))
    assert len(result.generated) == 2 and all(g.size == (16, 16) for g in result.generated)
    assert result.endpoint_cache == ["off", "off"]
    assert len(result.frames) == 5 and result.segments == [0, 0, 1, 1, 1]  # 2 segments, the joint once
    assert len(result.loras) == 3 and len(result.latents) == 3  # the made endpoints are morphed as inputs
    assert "endpoints" in result.timings
    # Endpoint k comes from the image with prompt k: two prompts, two different images.
    first, second = (np.asarray(g, dtype=np.float64) for g in result.generated)
    assert np.abs(first - second).mean() > 1.0


def test_the_same_request_makes_the_same_endpoint_bytes_and_the_cache_keeps_them(pipe, tmp_path):
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    config = MorphConfig(**FAST, seed=7)
    once = pipe([image], PROMPTS[:2], config)
    again = pipe([image], PROMPTS[:2], config)
    assert _png(once.generated[0]) == _png(again.generated[0])
    stronger = pipe([image], PROMPTS[:2], config.replace(endpoint_strength=1.0))  # 4 steps, not 2
    assert _png(stronger.generated[0]) != _png(once.generated[0])  # the options reach the pass

    cached = DiffMorpherPipeline(pipe.models, pipe.perceptual, TensorCache(DiskStore(tmp_path)))
    made = cached([image], PROMPTS[:2], config)
    read = cached([image], PROMPTS[:2], config)
    assert (made.endpoint_cache, read.endpoint_cache) == (["miss"], ["hit"])
    assert _png(read.generated[0]) == _png(made.generated[0]) == _png(once.generated[0])
    assert read.work.lora_fits == 0 and read.work.inversions == 0  # the made endpoint's LoRA and latent too
    # Kept like an uploaded image: its image_key names it for a later request.
    key = read.cache[1]["image_key"]
    assert _png(cached.stored_image(key)) == _png(made.generated[0])


def test_one_image_gives_a_lora_per_endpoint_and_they_sent_back_skip_every_fit(pipe):
    """The LoRAs of a one-image morph (made endpoints' too) are files like any other: sent back as
    lora_<i>, the morph fits nothing and gives the same frames bit for bit."""
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    config = MorphConfig(**FAST, seed=3, return_loras=True)
    first = pipe([image], PROMPTS, config)
    assert len(first.loras) == 3 and all(lora is not None for lora in first.loras)
    assert first.work.lora_fits == 3
    sent = [pipe.read_lora(lora_to_safetensors(lora), f"lora_{i}") for i, lora in enumerate(first.loras)]
    second = pipe([image], PROMPTS, config, loras=sent)
    assert (second.work.lora_fits, second.work.lora_steps) == (0, 0)
    assert torch.equal(first.frame_tensors, second.frame_tensors)
    with pytest.raises(ConfigError, match="need one LoRA \\(or None\\) per endpoint, got 1"):
        pipe([image], PROMPTS, config, loras=sent[:1])


@pytest.mark.parametrize(
    ("prompts", "options", "message"),
    [
        (PROMPTS[:1], {}, r"need between 2 and 8 images, got 1 \(or one image and 2 to 8 prompts\)"),
        (PROMPTS[:1] * 9, {}, "one image takes at most 8 prompts"),
        (PROMPTS[:2], {"endpoint_strength": 0.0}, "endpoint_strength must be in"),
        (PROMPTS[:2], {"endpoint_guidance": 31.0}, r"endpoint_guidance must be in \[1.0, 30.0\]"),
    ],
)
def test_bad_one_image_requests_are_refused_by_name(pipe, prompts, options, message):
    with pytest.raises(ConfigError, match=message):
        pipe([Image.new("RGB", (16, 16))], prompts, MorphConfig(**{**FAST, **options}))


RED_TO_BLUE = ["a red circle on a white background", "a blue circle on a white background"]
ACCEPTANCE = dict(num_frames=5, lora_steps=20, num_inference_steps=15, perceptual_metric="pixel")


def inside_shape(image: Image.Image) -> np.ndarray:
    """The pixels of the red circle in the demo image (not near-white), at `image`'s size."""
    source = Image.open(DEMO_DIR / "red_circle.png").convert("RGB").resize(image.size)
    return np.asarray(source, dtype=np.float64).min(axis=2) < 200


@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="embedded model not built")
def test_a_red_circle_and_a_blue_prompt_end_on_a_blue_circle():
    """The issue's acceptance on the embedded model: the made endpoint and the morph's last
    frame are blue inside the circle (mean blue over red), and the first frame stays red."""
    pipe = DiffMorpherPipeline.from_pretrained(EMBEDDED_MODEL, device="cpu")
    image = Image.open(DEMO_DIR / "red_circle.png")
    result = pipe([image], RED_TO_BLUE, MorphConfig(**ACCEPTANCE))
    mask = inside_shape(result.frames[-1])
    last = np.asarray(result.frames[-1], dtype=np.float64)[mask]
    first = np.asarray(result.frames[0], dtype=np.float64)[mask]
    made = np.asarray(result.generated[0], dtype=np.float64)[mask]
    print(f"last frame inside the circle: R {last[:, 0].mean():.0f} B {last[:, 2].mean():.0f}; "
          f"made endpoint R {made[:, 0].mean():.0f} B {made[:, 2].mean():.0f}; timings {result.timings}")
    assert last[:, 2].mean() > last[:, 0].mean() + 60
    assert made[:, 2].mean() > made[:, 0].mean() + 60
    assert first[:, 0].mean() > first[:, 2].mean() + 60
