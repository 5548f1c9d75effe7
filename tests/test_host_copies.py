"""No host round trips in the GPU loops: the whole morph on fake CUDA, its copies counted.

Issue 24: on a GPU every copy from pageable host memory to the device (and every read back) is a
synchronisation. The whole morph (`DiffMorpherPipeline.__call__`: encode, LoRA stage, inversion,
reschedule's measuring pass with LPIPS, endpoints and frames with attention replacement and
per-sample LoRA mixing) runs on fake CUDA with the CPU as the default device, as in a real
worker, under benchmarks.fake_cuda.TransferCounter. Before the fix: the issue counted 81
host->device copies per UNet call in the inversion, 56 of them from lora_mix.mixed_linear; this
morph on main at 785462c (the same counter) copied 776 times in its 13 UNet calls (56 a call from
mixed_linear, plus the attention store's mix weights and put indices).

The LoRA fit's backward cannot run on fake CUDA (tests/test_fake_cuda.py says why): the morph runs
with lora_steps=0 (the LoRA stage still builds and returns the LoRAs), and a training step's
forward is counted apart. The final PIL conversion needs real data and is replaced (host work on
the result, after the loops).
"""

from __future__ import annotations

import collections

import pytest
import torch
from PIL import Image

import diffmorpher.pipeline as pipeline_module
from benchmarks.fake_cuda import Transfer, TransferCounter, fake_cuda, fake_lpips, fake_models
from diffmorpher.config import MorphConfig
from diffmorpher.lora import ForwardNoising, draw_steps, initial_lora_stacks, lora_training, training_losses
from diffmorpher.perceptual import checkout_cache_path
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.conftest import EMBEDDED_MODEL

pytestmark = [
    pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model's configs"),
    pytest.mark.skipif(checkout_cache_path() is None or not checkout_cache_path().is_file(),  # type: ignore[union-attr]
                       reason="needs the LPIPS weights in .cache/lpips"),
]

# 5 frames: 3 intermediate; 4 rows per batch: pass 1 = [2 endpoints + 2 frames], [1 frame].
CONFIG = MorphConfig(num_frames=5, lora_steps=0, num_inference_steps=3, frame_batch_size=4, seed=3, resolution=64)
PASSES = 2  # the reschedule's measuring pass and the frames
BATCHES = 2 * PASSES + 1  # two batches a pass, one inversion batch (both images)


def by_site(transfers: list[Transfer]) -> dict[str, int]:
    """Copies per source line (without the line number: stable under edits), e.g.
    {"diffmorpher/batching.py on": 10}."""
    return dict(collections.Counter(f"{t.site.split(':')[0]} {t.site.split(' ')[-1]}" for t in transfers))


@pytest.fixture(scope="module")
def counted() -> tuple[TransferCounter, list[str]]:
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    real_to_images = pipeline_module.tensor_to_images
    pipeline_module.tensor_to_images = lambda frames: [None] * len(frames)  # needs real pixels
    try:
        with fake_cuda():
            models = fake_models("embedded", torch.bfloat16, "cuda")
            pipe = DiffMorpherPipeline(models, fake_lpips("cuda"))
            with TransferCounter(answer_reads=0.1) as counter:
                handles = counter.label(models.unet, "unet")
                result = pipe(images, ["a red circle", "a blue square"], CONFIG)
                for handle in handles:
                    handle.remove()
    finally:
        pipeline_module.tensor_to_images = real_to_images
    return counter, [result.perceptual_metric]


def test_the_unet_calls_copy_nothing_between_host_and_device(counted) -> None:
    counter, _ = counted
    # inversion 3 steps; measuring pass: coarse walk of round(0.8 * 3) = 2 steps, 2 batches; frames 3 steps, 2 batches
    assert counter.calls["unet"] == 3 + 2 * 2 + 2 * 3
    inside = [t for t in counter.transfers if "unet" in t.stage.split("/")]
    assert inside == [], counter.report(inside)


def test_reads_back_to_the_host_are_the_frames_and_the_reschedule_distances(counted) -> None:
    """No `.item()` or copy to the host in any loop: the result's frames once per batch of the
    final pass (decode leaves frames on the device; the measuring pass's stay there for LPIPS),
    the LPIPS distances once per segment, the fitted LoRAs in one copy, the inverted latents of
    the result in one copy."""
    counter, metric = counted
    assert metric == ["lpips-alex"]
    reads = by_site(counter.device_to_host())
    allowed = {
        "diffmorpher/emission.py add": 2,  # per batch of the final pass: the result's frames
        "diffmorpher/perceptual.py __call__": 1,  # the (N-1,) distances of the segment, then .tolist()
        "diffmorpher/transfer.py move_together": 1,  # the fitted LoRAs back to the host, one copy
        "diffmorpher/pipeline.py __call__": 1,  # the inverted latents in the result, one copy
    }
    assert reads.keys() <= allowed.keys(), counter.report(counter.device_to_host())
    for site, count in reads.items():
        assert count <= allowed[site], (site, count, counter.report(counter.device_to_host()))


def test_host_to_device_copies_are_a_few_per_morph_and_per_batch(counted) -> None:
    counter, _ = counted
    copies = by_site(counter.host_to_device())
    allowed = {
        "diffmorpher/conditioning.py encode": 1,  # the prompts' token ids, once
        "diffmorpher/pipeline.py encode_images": 1,  # the preprocessed images, once
        # peft builds its initial adapter on the host and moves each tensor to its layer's device,
        # once per fit (4 projections x 2 matrices x 14 attention layers of the embedded UNet)
        "diffmorpher/lora.py initial_lora_stacks": 112,
        "diffmorpher/lora.py __init__": 1,  # ForwardNoising's alpha_bar table, once per fit
        "diffmorpher/transfer.py move_together": 1,  # the LoRA stacks for mixing, one copy per morph
        "diffmorpher/batching.py on": 3 * BATCHES,  # per batch: mix weights, LoRA weights, alphas
        "diffmorpher/ddim.py _walk": BATCHES,  # per batch: the walk's timesteps
    }
    assert copies.keys() <= allowed.keys(), counter.report(counter.host_to_device())
    for site, count in copies.items():
        assert count <= allowed[site], (site, count, counter.report(counter.host_to_device()))
    assert copies["diffmorpher/batching.py on"] <= 3 * BATCHES


def test_a_lora_training_step_copies_nothing_to_the_device() -> None:
    """A fitting step's forward and loss read its noise and timesteps from draws moved for a
    block of steps at once (lora.draw_steps: two copies for all of them), not 3 per image."""
    config = MorphConfig(lora_steps=1)
    with fake_cuda():
        models = fake_models("embedded", torch.bfloat16, "cuda")
        mean = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16, device="cuda")
        text = models.conditioner.encode(["a red circle", "a blue square"], 64)
        stacks = initial_lora_stacks(models.unet, config, 0, 2, models.device)
        noising = ForwardNoising(models.schedule, models.device)
        generators = [torch.Generator().manual_seed(0) for _ in range(2)]
        with TransferCounter() as counter:
            with counter.stage("draw"):
                draws = draw_steps(generators, mean, len(noising.alphas), 50)
            with counter.stage("step"), lora_training(models.unet, stacks):
                for step in draws[:3]:
                    losses = training_losses(models.unet, noising, mean, mean, text, step)
    assert losses.shape == (2,) and losses.device.type == "cuda"
    assert len(counter.host_to_device("draw")) == 2, counter.report()
    assert counter.host_to_device("step") == [] and counter.device_to_host() == [], counter.report()
