"""The whole morph on the tiny random pipeline: structure, modes, batching, progress, errors."""

import pytest
import torch
from PIL import Image

from diffmorpher import ConfigError, MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.results import STAGE_FRAME_READY
from tests.conftest import EMBEDDED_MODEL

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


# ---------------------------------------------------------------------------- memory and timing
class _BatchSpy:
    """Wraps a module method, recording the batch size of each call."""

    def __init__(self, method) -> None:
        self.method, self.sizes = method, []

    def __call__(self, x, *args, **kwargs):
        self.sizes.append(x.shape[0])
        return self.method(x, *args, **kwargs)


def test_vae_decodes_and_encodes_in_slices_with_the_unsliced_result(pipe, monkeypatch):
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode(latents, vae_batch_size=5)
    decode = _BatchSpy(pipe.models.vae.decode)
    monkeypatch.setattr(pipe.models.vae, "decode", decode)
    sliced = pipe.decode(latents, vae_batch_size=2)
    assert decode.sizes == [2, 2, 1]
    assert sliced.shape == whole.shape == (5, 3, 16, 16) and sliced.device == pipe.models.device
    assert (sliced - whole).abs().max() < 1e-5

    mean, std = pipe.encode_images(_images(3), 16, vae_batch_size=3)
    encode = _BatchSpy(pipe.models.vae.encode)
    monkeypatch.setattr(pipe.models.vae, "encode", encode)
    sliced_mean, sliced_std = pipe.encode_images(_images(3), 16, vae_batch_size=2)
    assert encode.sizes == [2, 1]
    assert (sliced_mean - mean).abs().max() < 1e-5 and (sliced_std - std).abs().max() < 1e-5


def test_a_morph_decodes_at_most_vae_batch_size_frames_per_vae_call(pipe, monkeypatch):
    whole = pipe(_images(), _prompts(), MorphConfig(**FAST, frame_batch_size=5, vae_batch_size=5))
    decode = _BatchSpy(pipe.models.vae.decode)
    monkeypatch.setattr(pipe.models.vae, "decode", decode)
    sliced = pipe(_images(), _prompts(), MorphConfig(**FAST, frame_batch_size=5, vae_batch_size=2))
    assert decode.sizes == [2, 2, 1] * 2  # the reschedule's measuring pass, then the frames
    assert sliced.frame_tensors.device.type == "cpu"
    assert (sliced.frame_tensors - whole.frame_tensors).abs().max() < 1e-5


def test_stage_timings_synchronise_a_cuda_device_at_both_ends(monkeypatch):
    from diffmorpher.pipeline import _timed

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timings = {"frames": 1.0}
    with _timed(timings, "frames", torch.device("cuda", 1)):
        assert synced == [torch.device("cuda", 1)]  # queued work of earlier stages is not this one's
    assert synced == [torch.device("cuda", 1)] * 2 and timings["frames"] > 1.0


def test_a_cpu_morph_times_its_stages_without_synchronising(pipe, monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    result = pipe(_images(), _prompts(), MorphConfig(**FAST))
    assert synced == []
    stages = ["encode", "lora", "inversion", "reschedule", "frames"]
    assert all(result.timings[stage] > 0 for stage in stages)
    assert sum(result.timings[stage] for stage in stages) <= result.timings["total"]


def test_auto_frame_batch_follows_the_models_activation_estimate(pipe, monkeypatch):
    """With free memory reported, a morph's rows per UNet call come from the UNet's first
    feature map and one VAE slice (docs/sizing.md); an explicit size is kept."""
    from diffmorpher import batching

    models = pipe.models
    per_sample = batching.activation_bytes(models.unet.config.block_out_channels[0], 8, 4)  # 16 px -> 8x8 latent, fp32
    reserve = batching.RESERVE_BYTES + 3 * batching.decode_bytes(models.vae.config.block_out_channels[0], 16, 4)
    monkeypatch.setattr(batching, "free_memory_bytes", lambda device: reserve + 5 * per_sample)
    assert pipe.frame_batch_size(MorphConfig(vae_batch_size=3), 16) == 4
    assert pipe.frame_batch_size(MorphConfig(vae_batch_size=3, frame_batch_size=7), 16) == 7
    monkeypatch.setattr(batching, "free_memory_bytes", lambda device: None)
    assert pipe.frame_batch_size(MorphConfig(), 16) == 16


def test_the_result_says_what_auto_settled_on(pipe, monkeypatch):
    """frame_batch_size 0 and dtype "auto" are the worker's choice; the result (and the served
    metadata) names the choice, not the request's placeholder."""
    from diffmorpher import batching

    per_sample = batching.activation_bytes(pipe.models.unet.config.block_out_channels[0], 8, 4)
    reserve = batching.RESERVE_BYTES + 4 * batching.decode_bytes(pipe.models.vae.config.block_out_channels[0], 16, 4)
    monkeypatch.setattr(batching, "free_memory_bytes", lambda device: reserve + 2 * per_sample)
    result = pipe(_images(), _prompts(), MorphConfig(**FAST))
    assert MorphConfig(**FAST).frame_batch_size == 0
    assert (result.device, result.dtype, result.frame_batch_size) == ("cpu", "float32", 2)


def _morph_with_a_unet_taking_at_most(max_rows: int, pipe, config):
    """The morph with a UNet that raises torch.OutOfMemoryError (as a full GPU would) on more
    than `max_rows` rows; returns the result and every call's (grad enabled, rows)."""
    calls: list[tuple[bool, int]] = []

    def refuse_large(module, args, kwargs):
        rows = args[0].shape[0]
        calls.append((torch.is_grad_enabled(), rows))
        if rows > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {rows} rows")

    hook = pipe.models.unet.register_forward_pre_hook(refuse_large, with_kwargs=True)
    try:
        return pipe(_images(), _prompts(), config), calls
    finally:
        hook.remove()


@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model")
def test_a_frame_batch_that_runs_out_of_memory_is_halved_and_gives_the_same_frames():
    """A UNet that refuses batches of more than 2 rows (as a GPU would with torch.OutOfMemoryError):
    the 6-row passes are split 6 -> 3 -> 2 (+1) and the frames equal the unsplit run's (to the
    float error of other GEMM shapes, as frame_batch_size 1 against 4 above)."""
    pipe = DiffMorpherPipeline.from_pretrained(EMBEDDED_MODEL, device="cpu")
    config = MorphConfig(**{**FAST, "num_frames": 6, "lora_steps": 1}, frame_batch_size=6)
    reference = pipe(_images(), _prompts(), config)
    split, calls = _morph_with_a_unet_taking_at_most(2, pipe, config)
    seen = [rows for _, rows in calls]
    assert 6 in seen and 3 in seen  # refused, halved, refused, halved again
    assert max(rows for rows in seen if rows <= 2) == 2 and seen.count(3) == 2  # each pass halves once to 3
    assert (split.frame_tensors - reference.frame_tensors).abs().max() < 1e-4
    assert split.alphas == pytest.approx(reference.alphas, abs=1e-6)

    # With no row fitting, the frame pass fails once a single row does: 6 -> 3 -> 2 -> 1 -> raise.
    frames_config = config.replace(use_lora=False, use_reschedule=False)
    calls: list[int] = []

    def refuse_after_inversion(module, args, kwargs):
        calls.append(args[0].shape[0])
        if len(calls) > frames_config.num_inference_steps:  # inversion: one call per step
            raise torch.OutOfMemoryError("CUDA out of memory: even one row")

    hook = pipe.models.unet.register_forward_pre_hook(refuse_after_inversion, with_kwargs=True)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="even one row"):
            pipe(_images(), _prompts(), frames_config)
    finally:
        hook.remove()
    assert calls[frames_config.num_inference_steps:] == [6, 3, 2, 1]


@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="needs the embedded model")
def test_the_lora_fit_and_the_inversion_split_on_out_of_memory_too():
    """A UNet that takes one row at a time: the two images' joint LoRA fit and their joint
    inversion are split 2 -> 1 like the frame batches, and the LoRAs, inverted latents and
    frames equal the unsplit run's (each image fits from its own generator, seeded alike)."""
    pipe = DiffMorpherPipeline.from_pretrained(EMBEDDED_MODEL, device="cpu")
    config = MorphConfig(**{**FAST, "num_frames": 3, "lora_steps": 2}, frame_batch_size=2, use_reschedule=False)
    reference = pipe(_images(), _prompts(), config)
    split, seen = _morph_with_a_unet_taking_at_most(1, pipe, config)
    fit_calls = [rows for grad, rows in seen if grad]
    assert fit_calls[0] == 2 and set(fit_calls[1:]) == {1} and len(fit_calls) == 1 + 2 * config.lora_steps
    for ours, theirs in zip(split.loras, reference.loras):
        assert max((ours[key] - theirs[key]).abs().max().item() for key in theirs) < 1e-5
    for ours, theirs in zip(split.latents, reference.latents):
        assert (ours - theirs).abs().max() < 1e-4
    assert (split.frame_tensors - reference.frame_tensors).abs().max() < 1e-4
