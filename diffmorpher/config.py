"""The one source of truth for morph options and their defaults.

Every entry point (TorchServe handler, local CLI, gRPC client CLI, tests, export's
`model-config.yaml`) reads these defaults from here, so they cannot drift apart. The defaults are
those of the DiffMorpher paper's public implementation (see shared/method.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from morph_protocol import limits


# Where a message names the request field it is about (see FieldNamed).
FIELD = "{field}"


class FieldNamed:
    """An error that may be about one request field, by name (`field`), so a transport that
    calls its fields differently (the Open Inference Protocol's tensors) can say which, without
    parsing the text: the message is written with FIELD where the field is named, before any
    text the request supplied; `str()` names it as the native request does (`field 'image_1'`,
    `prompt 'prompt_0'`), `naming(label)` as the caller says."""

    field: str | None
    _template: str
    _kind: str

    def _set_field(self, message: str, field: str | None, kind: str) -> str:
        self.field, self._template, self._kind = field, message, kind
        return self.naming(f"{kind} {field!r}") if field is not None else message

    def naming(self, label: str) -> str:
        """The message with its field called `label` (the message itself when it names none)."""
        return self._template.replace(FIELD, label, 1) if self.field is not None else self._template


class ConfigError(FieldNamed, ValueError):
    """A morph request or option is invalid. Servers map this to a client error (HTTP 400 /
    gRPC INVALID_ARGUMENT) with `str(error)` as the message. `field`: the request field it is
    about, if one (`kind` says how the native request calls it: "field" or "prompt")."""

    def __init__(self, message: str, *, field: str | None = None, kind: str = "field") -> None:
        super().__init__(self._set_field(message, field, kind))


LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# "auto": the run device's own precision (devices.default_dtype: bf16 on a CUDA GPU that has it,
# else fp16; fp16 on MPS; fp32 on the CPU), decided where the model is loaded.
AUTO = "auto"
DTYPES: tuple[str, ...] = (AUTO, "float32", "float16", "bfloat16")
# frame_batch_size 0: chosen per morph from the device's free memory (batching.frame_batch_size);
# on the CPU (no such figure) DEFAULT_FRAME_BATCH, which is also the most the choice gives.
AUTO_FRAME_BATCH = 0
# 16 runs a 16-frame morph's pass as one batch: 17 % faster than 8 on the embedded model's CPU
# path (benchmarks/results).
DEFAULT_FRAME_BATCH = 16
# Images per VAE encode/decode call (MorphConfig.vae_batch_size's default).
DEFAULT_VAE_BATCH = 4
PERCEPTUAL_METRICS: tuple[str, ...] = ("lpips", "pixel")

# The paper's baseline, "DDIM inversion + slerp": every part of the method switched off.
PLAIN_BASELINE_OPTIONS: dict[str, Any] = {
    "use_lora": False, "attn_lambda": 0.0, "use_adain": False, "use_reschedule": False,
}

# The same algorithm run as the paper's public implementation runs it (`make bench`'s baseline):
# LoRAs fitted and frames denoised one at a time, the reschedule measuring with a full pass.
PAPER_IMPLEMENTATION_OPTIONS: dict[str, Any] = {"frame_batch_size": 1, "reschedule_probe_fraction": 1.0}

# The `fast` preset: half the LoRA steps (twice the learning rate, so steps x lr stays the
# paper's), 15 DDIM steps, and interpolated attention for 0.8 of them (0.6 at 15 steps leaves
# fixed pair 2 with 2.5x the baseline's PDV: too few replaced steps to carry the frames across
# its layout switch). Chosen on the previous embedded model's five fixed pairs (docs/quality.md
# "The fast preset"). Measured by `make bench` on the current model's five fixed pairs against
# the baseline (PAPER_IMPLEMENTATION_OPTIONS), benchmarks/results/bench-20261202T065428Z.json:
# 5.5x faster, PPL -14 %, PDV -44 %, endpoint PSNR -3.3 % (README "Benchmark").
FAST_PRESET_OPTIONS: dict[str, Any] = {
    "lora_steps": 100, "lora_lr": 4e-4, "num_inference_steps": 15, "attn_lambda": 0.8,
}

# Named option sets a request may ask for (`"preset": "fast"`); options it also sets win.
PRESETS: dict[str, dict[str, Any]] = {"default": {}, "fast": FAST_PRESET_OPTIONS}


def with_preset(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with its `preset` (if any) replaced by the preset's options, beneath the
    options given explicitly."""
    options = dict(options)
    if "preset" not in options:
        return options
    preset = options.pop("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset must be one of {list(PRESETS)}, got {show(preset)}")
    return {**PRESETS[preset], **options}




@dataclass
class MorphConfig:
    """Options of one morph. Field names are the request's JSON option names."""

    # Frames
    num_frames: int = 16
    seed: int = 0
    resolution: int | None = None  # None: the model's native resolution
    # Step 1: LoRA fitting
    use_lora: bool = True
    fixed_lora_alpha: float | None = None  # None: interpolate LoRAs; else use this alpha for all frames
    # One LoRA fitted on all the request's images together (each image with its own prompt) and
    # used for every frame, instead of one per image interpolated: K photos of one subject morph
    # with one fit and one LoRA to cache. It runs lora_steps optimizer steps, each on a batch of
    # all K images, so each image is seen lora_steps times, as by its own fit (docs/quality.md
    # "Shared LoRA").
    shared_lora: bool = False
    lora_rank: int = 16
    lora_steps: int = 200
    lora_lr: float = 2e-4
    # Step 2-4: inversion, sampling, attention interpolation
    num_inference_steps: int = 50
    attn_lambda: float = 0.6  # fraction of the denoising steps that use interpolated self-attention
    attn_beta: float = 0.0  # weight of the layer's own input mixed into the interpolated keys/values
    use_adain: bool = True
    # Step 5: reschedule
    use_reschedule: bool = True
    perceptual_metric: str = "lpips"
    # The reschedule's measuring pass walks this fraction of num_inference_steps (a coarse walk
    # over the same timesteps, from the same z_T: ddim.StepPlan.coarse); 1.0: a full second
    # pass, as the paper. On the five fixed pairs 0.8 costs a fifth less than the full pass at
    # the same quality (summed PDV -2.4 %, PPL +0.1 %); shorter passes move the frames that the
    # reschedule evens out (PDV +5 % at 0.7, +11 % at 0.5, +23 % on pair 2 at 0.6; docs/quality.md
    # "Measuring pass"). A repeated morph skips the pass altogether (its alphas are cached).
    reschedule_probe_fraction: float = 0.8
    # One image and K >= 2 prompts (endpoints.py): each missing endpoint is the image, DDIM-
    # inverted with its own prompt over the last `endpoint_strength` of the steps, denoised back
    # with the next prompt at classifier-free guidance `endpoint_guidance` (1: none). Chosen on the
    # embedded model's red-to-blue circle (docs/core.md "One image, several prompts").
    endpoint_strength: float = 0.6
    endpoint_guidance: float = 5.0
    # Execution
    # Rows (endpoints + frames, or images being fitted) per UNet call; AUTO_FRAME_BATCH (0): as
    # many as the device's free memory holds, at most DEFAULT_FRAME_BATCH (docs/sizing.md "Frame
    # batch on a GPU"); the CPU gets DEFAULT_FRAME_BATCH. A frame batch that still runs out of
    # memory is halved and retried, down to one row, before the morph fails.
    frame_batch_size: int = AUTO_FRAME_BATCH
    # Images per VAE encode/decode call: the decoder's full-resolution activations are the
    # largest of a morph (about 0.2 GB a 512 px frame in bf16, 0.8 GB at 1024 px), so a frame
    # batch is decoded in slices of this many; 4 keeps a 1024 px decode near 3 GB.
    vae_batch_size: int = DEFAULT_VAE_BATCH
    dtype: str = AUTO
    device: str | None = None  # None: best available (see devices.select_device)
    # Output: the morph's LoRAs (fitted or sent) as parts of the result, one diffusers LoRA file
    # per image (lora_file.lora_to_safetensors); off by default, since each costs bytes (fp32):
    # 0.45 MB an image on the embedded model at rank 16, 12.8 MB on SD 1.5.
    return_loras: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first offending option. The upper bounds
        (morph_protocol.limits) protect a shared server from requests that would run for hours
        or exhaust memory."""
        _check_int("num_frames", self.num_frames, 2, limits.MAX_FRAMES)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.resolution is not None:
            _check_int("resolution", self.resolution, 8, limits.MAX_RESOLUTION)
            if self.resolution % 8:
                raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        _check_bool("use_lora", self.use_lora)
        if self.fixed_lora_alpha is not None:
            _check_float("fixed_lora_alpha", self.fixed_lora_alpha, 0.0, 1.0)
        _check_bool("shared_lora", self.shared_lora)
        if self.shared_lora and not self.use_lora:
            raise ConfigError("shared_lora fits one LoRA for all the images; it needs use_lora=true")
        if self.shared_lora and self.fixed_lora_alpha is not None:
            raise ConfigError(
                "shared_lora uses one LoRA for every frame; fixed_lora_alpha (a fixed mix of two "
                "images' LoRAs) cannot be combined with it"
            )
        _check_int("lora_rank", self.lora_rank, 1, limits.MAX_LORA_RANK)
        _check_int("lora_steps", self.lora_steps, 0, limits.MAX_LORA_STEPS)
        _check_float("lora_lr", self.lora_lr, 0.0, 1.0, low_inclusive=False)
        _check_int("num_inference_steps", self.num_inference_steps, 1, limits.MAX_INFERENCE_STEPS)
        _check_float("attn_lambda", self.attn_lambda, 0.0, 1.0)
        _check_float("attn_beta", self.attn_beta, 0.0, 1.0)
        _check_bool("use_adain", self.use_adain)
        _check_bool("use_reschedule", self.use_reschedule)
        _check_choice("perceptual_metric", self.perceptual_metric, PERCEPTUAL_METRICS)
        _check_float("reschedule_probe_fraction", self.reschedule_probe_fraction, 0.0, 1.0, low_inclusive=False)
        _check_float("endpoint_strength", self.endpoint_strength, 0.0, 1.0, low_inclusive=False)
        _check_float("endpoint_guidance", self.endpoint_guidance, 1.0, limits.MAX_ENDPOINT_GUIDANCE)
        _check_int("frame_batch_size", self.frame_batch_size, AUTO_FRAME_BATCH, limits.MAX_FRAME_BATCH)
        _check_int("vae_batch_size", self.vae_batch_size, 1, limits.MAX_VAE_BATCH)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_bool("return_loras", self.return_loras)
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as 'cpu', got {show(self.device)}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None, **overrides: Any) -> "MorphConfig":
        """Build from request options; unknown keys are an error, never silently dropped."""
        merged = with_preset({**(options or {}), **overrides})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {name_list(unknown)}; valid options are {sorted(known | {'preset'})}"
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "MorphConfig":
        return dataclasses.replace(self, **changes)

    @property
    def lora_mode(self) -> str:
        """'interpolate' (the paper), 'fixed' (one LoRA mix for every frame), 'shared' (one LoRA
        fitted on all the images, for every frame) or 'none'."""
        if not self.use_lora:
            return "none"
        if self.shared_lora:
            return "shared"
        return "interpolate" if self.fixed_lora_alpha is None else "fixed"

    @property
    def reschedule_probe_steps(self) -> int:
        """DDIM steps of the reschedule's measuring pass (at least one)."""
        return max(1, int(round(self.reschedule_probe_fraction * self.num_inference_steps)))

    @property
    def endpoint_steps(self) -> int:
        """DDIM steps of a generated endpoint's inversion and of its denoising (at least one)."""
        return max(1, int(round(self.endpoint_strength * self.num_inference_steps)))

    @property
    def num_attn_replace_steps(self) -> int:
        """Denoising steps (from the start) whose self-attention uses the interpolated store."""
        return int(round(self.attn_lambda * self.num_inference_steps))


def name_list(names: Any, limit: int = 8, width: int = 40) -> str:
    """A list of names for an error message, short however many or long they are:
    "['a', 'b']", or "['a', ..., 'h', ... (10000 in all)]"."""
    names = [str(name) for name in names]
    shown = [name if len(name) <= width else name[:width] + "..." for name in names[:limit]]
    if len(names) <= limit:
        return repr(shown)
    return repr(shown)[:-1] + f", ... ({len(names)} in all)]"


def show(value: Any, width: int = 60) -> str:
    """repr(value) cut to `width` characters, so a hostile value cannot flood an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= width else text[:width] + "..."


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {show(value)}")


def _check_float(
    name: str, value: Any, low: float, high: float, *, low_inclusive: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {show(value)}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        bracket = "[" if low_inclusive else "("
        raise ConfigError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {show(value)}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {show(value)}")


@dataclass
class OutputOptions:
    """How the finished frames are delivered (handler and CLIs)."""

    format: str = "gif"  # gif | mp4 | frames-zip | png | webp
    frame_duration_ms: int = 100
    loop: bool = True
    # WebP: lossy at libwebp's quality scale by default (its own default, 80: a few times smaller
    # than the GIF of the same morph), or lossless (every pixel kept; webp_quality then unused).
    webp_quality: int = 80
    webp_lossless: bool = False

    from morph_protocol.formats import FORMATS  # the one list of output formats

    # Options that only the webp format reads: a request naming them asks for a WebP.
    WEBP_OPTIONS = ("webp_quality", "webp_lossless")  # a class constant, not a field

    def __post_init__(self) -> None:
        _check_choice("format", self.format, self.FORMATS)
        _check_int("frame_duration_ms", self.frame_duration_ms, 10, 10_000)
        _check_bool("loop", self.loop)
        _check_int("webp_quality", self.webp_quality, limits.MIN_WEBP_QUALITY, limits.MAX_WEBP_QUALITY)
        _check_bool("webp_lossless", self.webp_lossless)
