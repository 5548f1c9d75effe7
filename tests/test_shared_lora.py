"""shared_lora: one LoRA fitted on all the request's images, used for every frame.

On the tiny random pipeline: options, one fit (the result's work counts), frames other than
per-image LoRAs give, the LoRA applied as it is, the split of a fit's rows, the cache key of the
whole image set. On the embedded model: the endpoints still reproduce the inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmorpher import ConfigError, MorphConfig
from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.lora import fit_shared_lora, shared_lora_cache_key
from diffmorpher.lora_mix import SHARED_LORA, LoraStack, mixed_linear
from diffmorpher.metrics import psnr
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.preprocess import image_to_tensor
from tests.conftest import EMBEDDED_MODEL

FAST = dict(num_frames=5, lora_steps=3, lora_rank=4, num_inference_steps=4, perceptual_metric="pixel")


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")


def _images(count: int = 3) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    return [Image.new("RGB", (20 + 4 * i, 16), colours[i]) for i in range(count)]


def _prompts(count: int = 3) -> list[str]:
    return ["a red square", "a blue square", "a green square", "a yellow square"][:count]


# ---------------------------------------------------------------------------- options
def test_the_option_is_a_bool_and_refuses_the_combinations_that_mean_nothing() -> None:
    assert MorphConfig.from_dict({"shared_lora": True}).lora_mode == "shared"
    assert MorphConfig().shared_lora is False and MorphConfig().lora_mode == "interpolate"
    with pytest.raises(ConfigError, match="shared_lora must be true or false, got 'yes'"):
        MorphConfig(shared_lora="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="it needs use_lora=true"):
        MorphConfig(shared_lora=True, use_lora=False)
    with pytest.raises(ConfigError, match="fixed_lora_alpha .* cannot be combined"):
        MorphConfig(shared_lora=True, fixed_lora_alpha=0.5)


def test_given_loras_are_refused_with_a_shared_lora(pipe) -> None:
    lora = pipe(_images(2), _prompts(2), MorphConfig(**FAST, use_reschedule=False)).loras[0]
    with pytest.raises(ConfigError, match="cannot be combined with given LoRAs"):
        pipe(_images(2), _prompts(2), MorphConfig(**FAST, shared_lora=True), loras=[lora, None])


# ---------------------------------------------------------------------------- the morph
def test_three_images_fit_one_lora_and_their_frames_differ_from_per_image_loras(pipe) -> None:
    config = MorphConfig(**FAST, shared_lora=True)
    progress: list = []
    shared = pipe(_images(), _prompts(), config, progress=progress.append)
    per_image = pipe(_images(), _prompts(), config.replace(shared_lora=False))
    # One fit of lora_steps optimizer steps, not three; the inversions are the same three.
    assert shared.work.to_dict() == {"lora_fits": 1, "lora_steps": 3, "inversions": 3}
    assert per_image.work.to_dict() == {"lora_fits": 3, "lora_steps": 9, "inversions": 3}
    assert [e.step for e in progress if e.stage == "lora"] == [1, 2, 3]
    assert {e.item for e in progress if e.stage == "lora"} == {0}
    # The one LoRA stands for every image, and it is none of the per-image ones.
    assert len(shared.loras) == 3 and all(lora is shared.loras[0] for lora in shared.loras)
    for own in per_image.loras:
        assert max((shared.loras[0][k] - own[k]).abs().max().item() for k in own) > 1e-4
    assert len(shared.frames) == 9  # 2 segments of 5 frames, the joint once
    difference = (shared.frame_tensors - per_image.frame_tensors).abs().amax(dim=(1, 2, 3))
    assert difference.max().item() > 1e-3, difference


def test_the_shared_lora_is_applied_as_it_is() -> None:
    """SHARED_LORA gives what the paper's mix of two copies of the same LoRA gives, at any alpha."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    down, up = torch.randn(1, 3, 6, generator=generator), torch.randn(1, 5, 3, generator=generator)
    x = torch.randn(4, 7, 6, generator=generator)
    shared = mixed_linear(linear, x, LoraStack(down, up), SHARED_LORA)
    two_copies = LoraStack(down.repeat(2, 1, 1), up.repeat(2, 1, 1))
    alphas = torch.tensor([0.0, 0.3, 0.7, 1.0])
    mixed = mixed_linear(linear, x, two_copies, torch.stack([1 - alphas, alphas], dim=1))
    direct = linear(x) + (x @ down[0].T) @ up[0].T
    assert (shared - mixed).abs().max().item() < 1e-5
    assert (shared - direct).abs().max().item() < 1e-5
    assert (shared - linear(x)).abs().max().item() > 0.1


def test_the_rows_of_a_step_can_be_split_without_changing_the_lora(pipe) -> None:
    """The fit's K rows per step accumulate their gradients: 1 row per UNet call (what an
    out-of-memory restart ends at) gives the LoRA of 3."""
    config = MorphConfig(**FAST, shared_lora=True)
    mean, std = pipe.encode_images(_images(), 16)
    conditioning = pipe.encode_prompts(_prompts(), 16)
    args = (pipe.models.unet, pipe.models.schedule, mean, std, conditioning, config)
    whole = fit_shared_lora(*args, seed=0, rows_per_call=3)
    split = fit_shared_lora(*args, seed=0, rows_per_call=1)
    assert set(whole) == set(split)
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) < 1e-5
    assert max(whole[k].abs().max().item() for k in whole if "lora_B" in k) > 1e-4  # it moved


# ---------------------------------------------------------------------------- the cache
def test_the_cache_key_depends_on_every_image_every_prompt_and_the_order(pipe) -> None:
    images, prompts, config = _images(), _prompts(), MorphConfig(**FAST, shared_lora=True)
    key = shared_lora_cache_key(images, prompts, "model", config, 16)
    assert key == shared_lora_cache_key(_images(), _prompts(), "model", config, 16)
    changed = []
    for index in range(3):  # one pixel of one image
        edited = [image.copy() for image in images]
        edited[index].putpixel((12, 8), (1, 2, 3))  # inside every centre crop
        changed.append(shared_lora_cache_key(edited, prompts, "model", config, 16))
    changed.append(shared_lora_cache_key(images, [*prompts[:2], "a grey square"], "model", config, 16))
    changed.append(shared_lora_cache_key(images[::-1], prompts[::-1], "model", config, 16))
    changed.append(shared_lora_cache_key(images, prompts, "other model", config, 16))
    changed.append(shared_lora_cache_key(images, prompts, "model", config.replace(lora_steps=4), 16))
    assert len({key, *changed}) == 1 + len(changed)


def test_a_repeated_image_set_costs_no_fit_and_a_changed_image_one(tiny_sd_dir: Path, tmp_path: Path) -> None:
    cache = TensorCache(DiskStore(tmp_path / "cache"))
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=cache)
    config = MorphConfig(**FAST, shared_lora=True)
    first = pipe(_images(), _prompts(), config)
    again = pipe(_images(), _prompts(), config)
    assert first.work.to_dict() == {"lora_fits": 1, "lora_steps": 3, "inversions": 3}
    assert again.work.to_dict() == {"lora_fits": 0, "lora_steps": 0, "inversions": 0}
    assert [entry["lora"] for entry in again.cache] == ["hit"] * 3
    assert len({entry["lora_key"] for entry in again.cache}) == 1
    assert (first.frame_tensors - again.frame_tensors).abs().max().item() < 1e-5
    edited = _images()
    edited[2].putpixel((14, 8), (9, 9, 9))
    changed = pipe(edited, _prompts(), config)
    # A new set: a new LoRA, so every image is inverted again with it.
    assert changed.work.to_dict() == {"lora_fits": 1, "lora_steps": 3, "inversions": 3}
    assert changed.cache[0]["lora_key"] != first.cache[0]["lora_key"]
    # The per-image LoRAs of the same images are other entries.
    per_image = pipe(_images(), _prompts(), config.replace(shared_lora=False))
    assert per_image.work.lora_fits == 3


# ---------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="embedded model not built")
def test_endpoints_reproduce_the_inputs_on_the_embedded_model() -> None:
    """One LoRA for a red circle and a blue triangle still gives both back at the ends (at these
    steps the per-image LoRAs give 24.7 dB on this pair, the shared one 24.5-24.6 dB:
    benchmarks/results/shared-lora-embedded.json)."""
    from embedded_model.morph_pairs import morph_pair

    pipe = DiffMorpherPipeline.from_pretrained(EMBEDDED_MODEL, device="cpu")
    images, prompts = morph_pair(0)
    result = pipe(images, prompts, MorphConfig(num_frames=3, lora_steps=100, num_inference_steps=25,
                                               use_reschedule=False, shared_lora=True))
    resolution = pipe.models.native_resolution
    targets = [(image_to_tensor(image, resolution)[0] + 1) / 2 for image in images]
    first, last = psnr(result.frame_tensors[0], targets[0]), psnr(result.frame_tensors[-1], targets[1])
    assert result.work.lora_fits == 1
    assert first >= 24.0 and last >= 24.0, (first, last)
