"""The core's tensor path on *fake* CUDA tensors, so GPU-only bugs fail here without a GPU.

PyTorch's FakeTensorMode runs every op for its metadata only (shape, dtype, device) and raises
on a device mismatch (a CPU tensor meeting a CUDA one) and on reading a value back to the host
(`int(t)`, `.item()`, `bool(t)`: a GPU sync, and data a fake tensor does not have). Models are
built from configs inside the mode (random fake weights, no memory): the embedded model, and a
UNet + text encoder of Stable Diffusion 2.1-base's published sizes with a small latent, and
SDXL base (UNet, both text encoders, VAE) at its published sizes with a 16x16 latent in bf16.
The CPU stays the default device, as in a real worker: models are built on it and moved
(benchmarks/fake_cuda.py holds the mode and the model builders).

What runs on fake CUDA, in bf16 and fp16: prompt and image encoding, a LoRA training step's
forward and loss, inversion, the endpoint pass that stores attention, and frame batches with
attention replacement and per-sample LoRA mixing. The LoRA step's backward and AdamW update run
on fake *CPU* tensors (same dtypes): autograd sets up a CUDA context for CUDA tensors, which
needs a driver (pytorch/pytorch#92627).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor

from benchmarks.fake_cuda import fake_cuda, fake_models
from diffmorpher.attention import AttentionStore, MorphController, morph_attention
from diffmorpher.batching import frame_specs, segment_weights, sequence_batches
from diffmorpher.config import MorphConfig
from diffmorpher.emission import FrameCollector
from diffmorpher.lora import ForwardNoising, draw_steps, fit_loras, initial_lora_stacks, lora_training, training_losses
from diffmorpher.lora_mix import build_lora_stacks
from diffmorpher.models import MorphModels
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.reschedule import uniform_alphas
from tests.conftest import EMBEDDED_MODEL

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model's configs")

CONFIG = MorphConfig(num_frames=3, lora_steps=1, num_inference_steps=2, use_reschedule=False, seed=3)


def invert_and_denoise(pipe: DiffMorpherPipeline, models: MorphModels, mean: torch.Tensor, std: torch.Tensor,
                       text) -> tuple:
    """Zero-step LoRAs (the fit's backward runs on fake CPU, tested apart), inversion storing the
    endpoints' attention, and one frame batch with attention replacement and LoRA mixing."""
    loras = pipe.fit_loras(mean, std, text, CONFIG.replace(lora_steps=0), None, None)
    stacks = build_lora_stacks(loras, models.device, models.dtype)
    store = AttentionStore(2, CONFIG.num_attn_replace_steps)
    controller = MorphController(store, beta=CONFIG.attn_beta)
    with morph_attention(models.unet, controller, stacks):
        noise = pipe.invert(mean, text, controller, CONFIG, None)
        frames = pipe.denoise_sequence(frame_specs([uniform_alphas(3)]), noise, text, controller, CONFIG, "frames", None)
    return loras, store, noise, frames


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(0) for _ in range(2)]


def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]


def on(tensor: torch.Tensor, device: str, dtype: torch.dtype | None = None) -> bool:
    assert isinstance(tensor, FakeTensor)
    return tensor.device.type == device and (dtype is None or tensor.dtype == dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("size", ["embedded", "sd21-base"])
def test_the_morph_tensor_path_runs_on_cuda(size: str, dtype: torch.dtype) -> None:
    with fake_cuda():
        models = fake_models(size, dtype, "cuda")
        pipe = DiffMorpherPipeline(models, None)
        text = pipe.encode_prompts(["a red circle", "a blue square"])
        mean, std = pipe.encode_images(images(), 64)
        assert on(text.encoder_hidden_states, "cuda", dtype) and on(mean, "cuda", dtype)

        # A LoRA training step's forward and losses (its backward: see the CPU test below).
        stacks = initial_lora_stacks(models.unet, CONFIG, 0, 2, models.device)
        params = [t for stack in stacks.values() for t in (stack.down, stack.up)]
        assert params and all(on(p, "cuda", torch.float32) for p in params)
        with lora_training(models.unet, stacks):
            losses = training_losses(models.unet, ForwardNoising(models.schedule, models.device),
                                     mean, std, text, draw_steps(generators(), mean, 1000, 1)[0])
        assert on(losses, "cuda", torch.float32) and losses.shape == (2,)

        # Fresh adapters (0 steps) stand in for fitted LoRAs: same keys, shapes and dtypes.
        loras, store, noise, frames = invert_and_denoise(pipe, models, mean, std, text)
        assert all(on(t, "cpu", torch.float32) for lora in loras for t in lora.values())
        assert on(noise, "cuda", dtype) and noise.shape == mean.shape
        assert store.tensors and all(on(t, "cuda", dtype) for t in store.tensors.values())
        assert on(frames, "cuda", torch.float32) and frames.shape == (3, 3, 64, 64)  # decoded on the run device


def test_result_frames_go_to_the_cpu_once_where_they_are_collected() -> None:
    """decode() leaves frames on the run device (the reschedule's LPIPS reads them there); the
    result's collector moves each batch to the CPU, the measuring pass's keeps it on the device."""
    specs = frame_specs([uniform_alphas(4)])
    (batch,) = sequence_batches(specs, 2, CONFIG)
    with fake_cuda():
        decoded = torch.rand(4, 3, 8, 8, device="cuda")
        result, probe = (FrameCollector(specs, 2, "frames", None, stream=False, to_cpu=to_cpu) for to_cpu in (True, False))
        result.add(batch, decoded)
        probe.add(batch, decoded)
        assert on(result.tensor(), "cpu", torch.float32) and on(probe.tensor(), "cuda", torch.float32)
        assert result.tensor().shape == probe.tensor().shape == (4, 3, 8, 8)


def test_attention_mix_takes_weights_built_on_the_cpu() -> None:
    """The bug this test was written for: AttentionStore.mix cast the per-sample weights (built
    on the CPU by the pipeline) to the store's dtype but not to its device."""
    with fake_cuda():
        store = AttentionStore(2, 1)
        store.put("layer", 0, [0, 1], torch.randn(2, 16, 8, dtype=torch.bfloat16, device="cuda"))
        weights = torch.stack([segment_weights(0, 0.25, 2)]).to("cpu")
        mixed = store.mix("layer", 0, weights)
    assert on(mixed, "cuda", torch.bfloat16) and mixed.shape == (1, 16, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("size", ["embedded", "sd21-base"])
def test_a_lora_training_step_with_backward_and_update_in_half_precision(
    size: str, dtype: torch.dtype
) -> None:
    """fp32 LoRA parameters and optimiser state on a half-precision UNet: forward, backward and
    AdamW step, one image and two at once (through the per-sample LoRA mixing), with the fitted
    LoRAs returned in fp32 on the CPU."""
    with fake_cuda():
        models = fake_models(size, dtype, "cpu")
        pipe = DiffMorpherPipeline(models, None)
        text = pipe.encode_prompts(["a red circle", "a blue square"])
        mean, std = pipe.encode_images(images(), 64)
        losses = []
        (lora,) = fit_loras(models.unet, models.schedule, mean[:1], std[:1], text.select([0]),
                            CONFIG.replace(lora_steps=2), seed=0, on_step=lambda step, total, loss: losses.append(loss))
        batched = fit_loras(models.unet, models.schedule, mean, std, text, CONFIG.replace(lora_steps=2),
                            seed=0, on_step=lambda step, total, loss: losses.append(loss))
    assert len(losses) == 4 and all(on(loss, "cpu", torch.float32) for loss in losses)
    assert [loss.shape for loss in losses] == [(1,), (1,), (2,), (2,)]
    for fitted in (lora, *batched):
        assert fitted.keys() == lora.keys() and all(on(t, "cpu", torch.float32) for t in fitted.values())
    assert not any("lora" in name for name, _ in models.unet.named_parameters())  # adapter removed


def test_the_sdxl_morph_tensor_path_runs_on_cuda_in_bf16() -> None:
    """SDXL base's sizes on fake CUDA in bf16: both encoders' conditioning (2048 channels, pooled
    1280, time ids), a LoRA step's forward, inversion, and frames with up-block attention
    replacement (10 transformer layers per block) and LoRA mixing, all through `unet_kwargs`."""
    dtype = torch.bfloat16
    sdxl_images = [Image.new("RGB", (128, 128), "red"), Image.new("RGB", (128, 128), "blue")]
    with fake_cuda():
        models = fake_models("sdxl-base", dtype, "cuda", latent_size=16)
        pipe = DiffMorpherPipeline(models, None)
        text = pipe.encode_prompts(["a red circle", "a blue square"], 128)
        added = text.added_cond_kwargs
        assert added is not None and on(text.encoder_hidden_states, "cuda", dtype)
        assert text.encoder_hidden_states.shape == (2, 77, 2048)
        assert added["text_embeds"].shape == (2, 1280) and on(added["text_embeds"], "cuda", dtype)
        assert added["time_ids"].shape == (2, 6) and on(added["time_ids"], "cuda", dtype)
        mean, std = pipe.encode_images(sdxl_images, 128)
        assert on(mean, "cuda", dtype) and mean.shape == (2, 4, 16, 16)

        stacks = initial_lora_stacks(models.unet, CONFIG, 0, 2, models.device)
        with lora_training(models.unet, stacks):
            losses = training_losses(models.unet, ForwardNoising(models.schedule, models.device),
                                     mean, std, text, draw_steps(generators(), mean, 1000, 1)[0])
        assert on(losses, "cuda", torch.float32) and losses.shape == (2,)

        loras, store, noise, frames = invert_and_denoise(pipe, models, mean, std, text)
        assert any(".transformer_blocks.9.attn1.to_q" in key for key in loras[0])  # 10 layers per block
        assert on(noise, "cuda", dtype) and noise.shape == mean.shape
        layers = {layer for layer, _ in store.tensors}
        assert len(layers) == 3 * 10 + 3 * 2  # up blocks 0 and 1: 3 attentions of 10 and of 2 layers
        assert all(on(t, "cuda", dtype) for t in store.tensors.values())
        assert on(frames, "cuda", torch.float32) and frames.shape == (3, 3, 128, 128)
