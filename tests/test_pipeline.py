"""The whole morph on the tiny random pipeline: structure, modes, batching, progress, errors."""

import pytest
import torch
from PIL import Image

from diffmorpher import ConfigError, MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.results import STAGE_FRAME_READY

FAST = dict(num_frames=5, lora_steps=2, lora_rank=4, num_inference_steps=4, perceptual_metric="pixel")


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu")


def _images(count: int = 2) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    return [Image.new("RGB", (20 + 4 * i, 16), colours[i]) for i in range(count)]


def _prompts(count: int = 2) -> list[str]:
    return ["a red square", "a blue square", "a green square", "a yellow square"][:count]


def test_batch_size_one_and_n_give_the_same_frames(pipe):
    one = pipe(_images(), _prompts(), MorphConfig(**FAST, frame_batch_size=1))
    many = pipe(_images(), _prompts(), MorphConfig(**FAST, frame_batch_size=4))
    assert one.alphas == pytest.approx(many.alphas, abs=1e-4)
    assert (one.frame_tensors - many.frame_tensors).abs().max() < 1e-4


def test_frames_alphas_loras_and_latents_are_returned(pipe):
    progress = []
    result = pipe(_images(), _prompts(), MorphConfig(**FAST), progress=progress.append)
    assert len(result.frames) == 5 and result.frame_tensors.shape == (5, 3, 16, 16)
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert result.alphas == sorted(result.alphas)
    assert len(result.loras) == 2 and all(k.endswith(".weight") for k in result.loras[0])
    assert [z.shape for z in result.latents] == [(1, 4, 8, 8)] * 2
    assert result.perceptual_metric == "pixel-l2"
    assert {"lora", "inversion", "frames", "reschedule", "total"} <= set(result.timings)
    frame_events = [e for e in progress if e.stage == STAGE_FRAME_READY]
    assert [e.frame_index for e in frame_events] == list(range(5))
    assert all(e.frame is not None for e in frame_events)
    for item in (0, 1):  # both LoRAs fitted together: every step reported for each image
        assert [e.step for e in progress if e.stage == "lora" and e.item == item] == [1, 2]


def test_given_loras_are_used_instead_of_fitting(pipe):
    first = pipe(_images(), _prompts(), MorphConfig(**FAST, use_reschedule=False))
    progress = []
    second = pipe(
        _images(), _prompts(), MorphConfig(**FAST, use_reschedule=False),
        loras=first.loras, progress=progress.append,
    )
    assert not [e for e in progress if e.stage == "lora"]
    assert (first.frame_tensors - second.frame_tensors).abs().max() < 1e-5


def test_no_lora_and_fixed_lora_modes(pipe):
    none = pipe(_images(), _prompts(), MorphConfig(**FAST, use_lora=False))
    assert none.loras == [None, None] and len(none.frames) == 5
    fixed = pipe(_images(), _prompts(), MorphConfig(**FAST, fixed_lora_alpha=0.5))
    assert len(fixed.frames) == 5
    assert (fixed.frame_tensors - none.frame_tensors).abs().max() > 0


def test_multi_image_morph_shares_joints(pipe):
    config = MorphConfig(**{**FAST, "num_frames": 4})
    result = pipe(_images(3), _prompts(3), config)
    assert len(result.frames) == 2 * (4 - 1) + 1
    assert result.segments == [0, 0, 0, 1, 1, 1, 1]
    assert result.alphas[3] == 0.0  # the joint appears once, as the start of segment 1
    pair = pipe(_images(2), _prompts(2), config)
    # Segment 0 of the 3-image morph is the 2-image morph, except for attention mixes,
    # which see the same two endpoints: frames match.
    assert (result.frame_tensors[:4] - pair.frame_tensors).abs().max() < 1e-4


def test_seed_makes_the_morph_deterministic(pipe):
    a = pipe(_images(), _prompts(), MorphConfig(**FAST, seed=5))
    b = pipe(_images(), _prompts(), MorphConfig(**FAST, seed=5))
    assert torch.equal(a.frame_tensors, b.frame_tensors)


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (_images(1), _prompts(1), "need between 2 and 8 images, got 1"),
        (_images(1) * 9, _prompts(1) * 9, "need between 2 and 8 images, got 9"),  # morph_protocol.limits
        (_images(2), _prompts(1), "one prompt per image"),
        (_images(2), ["ok", 3], "prompt 1 must be a string"),
    ],
)
def test_bad_inputs_raise_config_error(pipe, images, prompts, message):
    with pytest.raises(ConfigError, match=message):
        pipe(images, prompts, MorphConfig(**FAST))


def test_a_failed_morph_leaves_the_unet_clean(pipe):
    originals = dict(pipe.models.unet.attn_processors)
    bad_lora = {"nonsense.lora_A.weight": torch.zeros(1)}
    with pytest.raises(ConfigError):
        pipe(_images(), _prompts(), MorphConfig(**FAST), loras=[bad_lora, bad_lora])
    assert pipe.models.unet.attn_processors == originals
    assert not any("lora" in name for name, _ in pipe.models.unet.named_parameters())


class _StopAfter:
    """A StopCheck that says stop on its `limit`-th call, counting every call."""

    def __init__(self, limit: int, kind: str = "deadline") -> None:
        self.limit = limit
        self.kind = kind
        self.calls = 0

    def __call__(self):
        from diffmorpher import StopReason

        self.calls += 1
        return StopReason(self.kind, f"stopped at check {self.calls}") if self.calls >= self.limit else None


@pytest.mark.parametrize(("limit", "stage"), [(1, "lora"), (5, "inversion"), (12, "frames")])
def test_stop_check_ends_the_morph_in_the_stage_it_fires(pipe, limit, stage):
    """Checks run once per LoRA step (2 here: both LoRAs are fitted in one batch), then once per
    UNet call (4 inversion steps, endpoints, frames): the morph stops at the first check that
    says stop and the UNet is left without LoRA layers, so the next morph is unaffected."""
    from diffmorpher import MorphStopped

    config = MorphConfig(**FAST, use_reschedule=False, frame_batch_size=4)
    reference = pipe(_images(), _prompts(), config)
    stop = _StopAfter(limit)
    with pytest.raises(MorphStopped) as raised:
        pipe(_images(), _prompts(), config, stop=stop)
    assert stop.calls == limit
    assert raised.value.stage == stage and raised.value.reason.kind == "deadline"
    again = pipe(_images(), _prompts(), config)
    assert (again.frame_tensors - reference.frame_tensors).abs().max() < 1e-5


def test_stop_check_is_asked_at_every_lora_and_denoising_step(pipe):
    config = MorphConfig(**FAST, use_reschedule=False, frame_batch_size=4)
    counter = _StopAfter(10**9)
    pipe(_images(), _prompts(), config, stop=counter)
    # 2 LoRA steps (both LoRAs in one batch) + inversion (4 steps) + endpoints (4) + frames (4)
    assert counter.calls == 2 + 4 + 4 + 4
