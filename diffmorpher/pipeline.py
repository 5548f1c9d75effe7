"""DiffMorpherPipeline: the paper's algorithm as numbered stages.

    1. encode prompts and images       (one preprocessing for every stage)
    2. fit one LoRA per image          (lora.py, peft)
    3. DDIM-invert each image          (ddim.py, with its own LoRA mix loaded)
    4. reschedule: a measuring pass at uniform alphas (a coarse walk over `reschedule_probe_fraction`
       of the DDIM steps); alphas that make the perceptual distance between frames even (reschedule.py)
    5. denoise the endpoints, storing up-block self-attention inputs   (attention.py), in the
       same batches as
    6. the intermediate frames, each sample with its own alpha: slerp + AdaIN latents, lerped
       text embedding, per-sample LoRA mix, interpolated attention

K >= 2 images give K-1 segments; image k is the alpha = 1 end of segment k-1 and the alpha = 0 end
of segment k, so its LoRA, inverted latent and stored attention are computed once and shared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .attention import (
    MODE_OFF,
    MODE_REPLACE,
    MODE_STORE,
    AttentionStore,
    MorphController,
    morph_attention,
)
from .cache import KEY as CACHE_KEY
from .cache import CacheKeys, CacheMiss, TensorCache
from .config import ConfigError, MorphConfig, show
from .ddim import ddim_invert, ddim_sample
from .devices import resolve_dtype, select_device
from .interpolation import interpolate_latents
from .interrupt import StopCheck, never_stop, raise_if_stopped
from .lora import fit_loras_batched, image_cache_key, inversion_cache_key, lora_cache_key
from .lora_mix import build_lora_stacks
from .models import MorphModels, load_morph_models
from .perceptual import PerceptualDistance, PixelDistance, consecutive_distances, load_perceptual
from .preprocess import image_to_tensor, tensor_to_images, to_model_square
from .reschedule import reschedule_alphas, schedule_cache_key, uniform_alphas
from .results import (
    STAGE_FRAME_READY,
    STAGE_FRAMES,
    STAGE_INVERSION,
    STAGE_LORA,
    STAGE_RESCHEDULE,
    MorphResult,
    ProgressCallback,
    ProgressEvent,
)

logger = logging.getLogger(__name__)

MAX_IMAGES = 16


@dataclass(frozen=True)
class FrameSpec:
    """One frame to denoise: segment k (between images k and k+1) at alpha."""

    segment: int
    alpha: float
    index: int  # position in the final, concatenated sequence


class _FrameEmitter:
    """Reports finished frames to the progress callback strictly in sequence order."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.ready: dict[int, torch.Tensor] = {}
        self.next_index = 0

    def add(self, index: int, frame: torch.Tensor) -> None:
        self.ready[index] = frame
        while self.progress and self.next_index in self.ready:
            self.progress(
                ProgressEvent(
                    stage=STAGE_FRAME_READY,
                    step=self.next_index + 1,
                    total=self.total,
                    frame=tensor_to_images(self.ready[self.next_index].unsqueeze(0))[0],
                    frame_index=self.next_index,
                    num_frames=self.total,
                )
            )
            self.next_index += 1


class DiffMorpherPipeline:
    """Morph K >= 2 images into K-1 segments of frames.

    Usage::

        pipe = DiffMorpherPipeline.from_pretrained("models/tiny-shapes-sd")
        result = pipe([img_a, img_b], ["a red circle", "a blue triangle"], MorphConfig(num_frames=8))
        result.frames  # PIL images, frame 0 reproduces img_a, the last img_b

    Not re-entrant: one morph at a time per pipeline (the UNet's attention processors are
    swapped for the duration of a call and restored afterwards).
    """

    def __init__(
        self,
        models: MorphModels,
        perceptual: PerceptualDistance | None = None,
        cache: TensorCache | None = None,
    ) -> None:
        self.models = models
        self.perceptual = perceptual
        self.cache = cache  # fitted LoRAs and inverted latents by content key (cache.py)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        lpips_weights: str | Path | None = None,
        cache: TensorCache | None = None,
    ) -> "DiffMorpherPipeline":
        resolved = device if isinstance(device, torch.device) else select_device(device)
        models = load_morph_models(source, resolved, resolve_dtype(dtype, resolved))
        return cls(models, load_perceptual("lpips", lpips_weights, resolved), cache)

    # ------------------------------------------------------------------ entry point
    def __call__(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        config: MorphConfig | None = None,
        *,
        loras: Sequence[dict[str, torch.Tensor] | None] | None = None,
        progress: ProgressCallback | None = None,
        stop: StopCheck = never_stop,
    ) -> MorphResult:
        """`stop` is asked between steps whether to go on (deadline, cancelled client); when it
        says stop, MorphStopped is raised and the UNet is left as it was."""
        config = config or MorphConfig()
        self.check_inputs(images, prompts, config, loras)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        resolution = config.resolution or self.models.native_resolution
        num_images = len(images)
        with torch.no_grad():
            # 1. encode prompts and images
            with _timed(timings, "encode"):
                text = self.encode_prompts(prompts)
                latent_mean, latent_std = self.encode_images(images, resolution)
            keys = self.cache_keys(images, prompts, config, resolution, given=loras)
            self.remember_images(images, keys, resolution)
            # 2. fit LoRAs
            with _timed(timings, STAGE_LORA):
                fitted = self.fit_loras(latent_mean, latent_std, text, config, loras, progress, stop, keys)
            stacks = None
            if config.lora_mode != "none":
                stacks = build_lora_stacks(fitted, self.models.device, self.models.dtype)  # type: ignore[arg-type]
            store = AttentionStore(num_images, config.num_attn_replace_steps)
            controller = MorphController(store, beta=config.attn_beta)
            # Inference only from here on (the LoRA fit above needs autograd): no version
            # counters or view tracking on any tensor the denoising makes.
            with torch.inference_mode(), morph_attention(self.models.unet, controller, stacks):
                # 3. invert every image with its own LoRA mix
                with _timed(timings, STAGE_INVERSION):
                    noise = self.invert(latent_mean, text, controller, config, progress, stop, keys)
                alphas = uniform_alphas(config.num_frames)
                all_alphas = [alphas] * (num_images - 1)
                metric_name, metric_weights = "none", ""
                # 4. reschedule: the perceptual distances of a measuring pass at uniform alphas
                # (a coarse walk: `reschedule_probe_fraction` of the steps), and alphas that even them out
                schedule_state = "off"
                if config.use_reschedule:
                    with _timed(timings, STAGE_RESCHEDULE):
                        metric = self.perceptual_metric(config)
                        metric_name, metric_weights = metric.name, metric.weights
                        schedule_key = self._schedule_key(keys, config, metric)
                        cached_alphas = self._cached_schedule(schedule_key, num_images, config.num_frames)
                        schedule_state = "off" if schedule_key is None else "hit" if cached_alphas else "miss"
                        if cached_alphas is not None:
                            all_alphas = cached_alphas
                        else:
                            probe = self.denoise_sequence(
                                _specs(num_images, alphas), noise, text, controller, config,
                                STAGE_RESCHEDULE, progress, _FrameEmitter(None, 0), stop,
                                walk_steps=config.reschedule_probe_steps,
                            )
                            all_alphas = self.reschedule(probe, alphas, num_images, metric)
                            if schedule_key is not None and self.cache is not None:
                                self.cache.save(schedule_key, {"alphas": torch.tensor(all_alphas, dtype=torch.float64)})
                # 5-6. endpoints (storing attention) and frames, streamed in order as they finish
                total = (num_images - 1) * (config.num_frames - 1) + 1
                with _timed(timings, STAGE_FRAMES):
                    frames = self.denoise_sequence(
                        _specs_per_segment(all_alphas), noise, text, controller, config,
                        STAGE_FRAMES, progress, _FrameEmitter(progress, total), stop,
                    )
        timings["total"] = time.perf_counter() - started
        frame_alphas, frame_segments = _flatten(all_alphas)
        return MorphResult(
            frames=tensor_to_images(frames),
            frame_tensors=frames,
            alphas=frame_alphas,
            segments=frame_segments,
            loras=list(fitted),
            latents=[z.unsqueeze(0).float().cpu() for z in noise],
            timings=timings,
            perceptual_metric=metric_name,
            perceptual_weights=metric_weights,
            seed=config.seed,
            resolution=resolution,
            cache=[key.report() for key in keys],
            schedule_cache=schedule_state,
        )

    # ------------------------------------------------------------------ stage 0: checks
    def check_inputs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        config: MorphConfig,
        loras: Sequence[dict[str, torch.Tensor] | None] | None,
    ) -> None:
        if not 2 <= len(images) <= MAX_IMAGES:
            raise ConfigError(f"need between 2 and {MAX_IMAGES} images, got {len(images)}")
        if len(prompts) != len(images):
            raise ConfigError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if loras is not None and len(loras) != len(images):
            raise ConfigError(f"need one LoRA (or None) per image, got {len(loras)}")
        multiple = self.models.vae_scale_factor * 2 ** (len(self.models.unet.config.down_block_types) - 1)
        resolution = config.resolution or self.models.native_resolution
        if resolution % multiple:
            raise ConfigError(f"resolution must be a multiple of {multiple} for this model, got {resolution}")
        if self.models.device.type == "cpu" and self.models.dtype == torch.float16:
            raise ConfigError("float16 is not supported on CPU")

    # ------------------------------------------------------------------ stage 1: encode
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(K, 77, D) CLIP text embeddings (last hidden state, as SD conditions on)."""
        tokenizer = self.models.tokenizer
        tokens = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.models.device)
        return self.models.text_encoder(tokens)[0].to(self.models.dtype)

    def encode_images(
        self, images: Sequence[Image.Image], resolution: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of each image, scaled like the latents the UNet sees."""
        pixels = torch.cat([image_to_tensor(image, resolution) for image in images])
        pixels = pixels.to(device=self.models.device, dtype=self.models.dtype)
        posterior = self.models.vae.encode(pixels).latent_dist
        scale = self.models.vae.config.scaling_factor
        return posterior.mean * scale, posterior.std * scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) float32 images in [0, 1] on the CPU."""
        scale = self.models.vae.config.scaling_factor
        images = self.models.vae.decode(latents / scale).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    # ------------------------------------------------------------------ cache keys
    def cache_keys(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        config: MorphConfig,
        resolution: int,
        given: Sequence[dict[str, torch.Tensor] | None] | None = None,
    ) -> list[CacheKeys]:
        """Per image, the content keys of its LoRA and its inverted latent (empty without a
        cache; no latent key where the inversion depends on another image's LoRA)."""
        if self.cache is None:
            return []
        keys = []
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            lora = None
            if config.lora_mode != "none" and not (given is not None and given[index] is not None):
                lora = lora_cache_key(image, prompt, self.models.identity, config, resolution)
            latent = None
            if config.lora_mode == "none" or (config.lora_mode == "interpolate" and lora):
                latent = inversion_cache_key(image, prompt, self.models.identity, config, resolution, lora)
            keys.append(CacheKeys(lora, latent, image_cache_key(image, resolution)))
        return keys

    def remember_images(self, images: Sequence[Image.Image], keys: Sequence[CacheKeys], resolution: int) -> None:
        """Keep each image as the model saw it, under its image key, so a later request can
        name it instead of sending it (`stored_image`)."""
        if self.cache is None:
            return
        for image, key in zip(images, keys):
            if key.image and self.cache.load(key.image) is None:
                pixels = torch.from_numpy(np.asarray(to_model_square(image, resolution), dtype=np.uint8).copy())
                self.cache.save(key.image, {"pixels": pixels})

    def stored_image(self, key: str) -> Image.Image:
        """The image a previous result named by its `image_key` (CacheKeys.report). Raises
        ConfigError for a malformed key or a server without a cache, CacheMiss when the entry is
        gone (evicted, or the morph ran on a server with another cache)."""
        if self.cache is None:
            raise ConfigError("this server keeps no cache, so it cannot resolve image references; send the image")
        if not CACHE_KEY.match(key) or len(key) != 64:
            raise ConfigError(f"an image reference is a 64-digit hex image_key from a previous result, got {show(key)}")
        entry = self.cache.load(key)
        pixels = entry.get("pixels") if entry else None
        if pixels is None or pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3:
            raise CacheMiss(
                f"image {key[:16]}... is not in this server's cache (evicted, or stored by another "
                f"server); send the image itself"
            )
        return Image.fromarray(pixels.numpy(), mode="RGB")

    # ------------------------------------------------------------------ stage 2: LoRAs
    def fit_loras(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        text: torch.Tensor,
        config: MorphConfig,
        given: Sequence[dict[str, torch.Tensor] | None] | None,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        keys: Sequence[CacheKeys] | None = None,
    ) -> list[dict[str, torch.Tensor] | None]:
        """One LoRA per image: reuse a given one, else read it from the cache, else fit it (and
        cache it). None in no-LoRA mode. Missing LoRAs are fitted together, `frame_batch_size`
        images per UNet call (lora.fit_loras_batched), under their cache keys' locks: a worker
        that needs a LoRA another worker is fitting waits for it and reads it."""
        if config.lora_mode == "none":
            return [None] * len(latent_mean)
        fitted: dict[int, dict[str, torch.Tensor]] = {
            index: lora for index, lora in enumerate(given or []) if lora is not None
        }
        todo = [index for index in range(len(latent_mean)) if index not in fitted]
        cached = self.cache is not None and bool(keys)
        if not cached:
            fitted |= self._fit(todo, latent_mean, latent_std, text, config, progress, stop)
            return [fitted[index] for index in range(len(latent_mean))]
        assert self.cache is not None and keys is not None
        index_of = {keys[index].lora: index for index in todo}

        def fit(missing: list[str]) -> dict[str, dict[str, torch.Tensor]]:
            new = self._fit([index_of[key] for key in missing], latent_mean, latent_std, text, config, progress, stop)
            return {key: new[index_of[key]] for key in missing}

        loras, hits = self.cache.get_or_compute_many([keys[index].lora for index in todo], fit)
        for index in todo:
            fitted[index] = loras[keys[index].lora]
            keys[index].lora_hit = keys[index].lora in hits
        return [fitted[index] for index in range(len(latent_mean))]

    def _fit(
        self,
        indices: list[int],
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        text: torch.Tensor,
        config: MorphConfig,
        progress: ProgressCallback | None,
        stop: StopCheck,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Fit the LoRAs of `indices`, `frame_batch_size` at a time."""
        fitted: dict[int, dict[str, torch.Tensor]] = {}
        for chunk in _chunks(indices, config.frame_batch_size):

            def on_step(step: int, total: int, losses: torch.Tensor, items: list[int] = chunk) -> None:
                raise_if_stopped(stop, STAGE_LORA)
                if progress:
                    for item in items:
                        progress(ProgressEvent(stage=STAGE_LORA, step=step, total=total, item=item))

            loras = fit_loras_batched(
                self.models.unet, self.models.schedule, latent_mean[chunk], latent_std[chunk], text[chunk],
                config, seed=config.seed, on_step=on_step,
            )
            fitted |= dict(zip(chunk, loras))
        return fitted

    # ------------------------------------------------------------------ stage 3: inversion
    def invert(
        self,
        latent_mean: torch.Tensor,
        text: torch.Tensor,
        controller: MorphController,
        config: MorphConfig,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        keys: Sequence[CacheKeys] | None = None,
    ) -> torch.Tensor:
        """z_T of each image (K, C, h, w), from its posterior mean, with its endpoint LoRA mix;
        read from the cache where an image's latent is there (and cached when computed)."""
        num_images = len(latent_mean)
        results: dict[int, torch.Tensor] = {}
        if self.cache is not None and keys:
            for index, key in enumerate(keys):
                entry = self.cache.load(key.latent) if key.latent else None
                if entry is not None:
                    results[index] = entry["latent"].to(device=latent_mean.device, dtype=latent_mean.dtype)
                    key.latent_hit = True
        missing = [index for index in range(num_images) if index not in results]
        for chunk in _chunks(missing, config.frame_batch_size):
            weights = _one_hot(chunk, num_images)
            self._set_batch(controller, MODE_OFF, weights, self._endpoint_lora_weights(chunk, num_images, config))

            def on_step(step: int, total: int, item: int = chunk[0]) -> None:
                if progress:
                    progress(ProgressEvent(stage=STAGE_INVERSION, step=step, total=total, item=item))

            inverted = ddim_invert(
                self.models.schedule, self._predictor(controller, text[chunk], stop, STAGE_INVERSION),
                latent_mean[chunk], config.num_inference_steps, on_step,
            )
            for index, latent in zip(chunk, inverted):
                results[index] = latent
                key = keys[index].latent if keys else None
                if self.cache is not None and key:
                    self.cache.save(key, {"latent": latent})
        return torch.stack([results[index] for index in range(num_images)])

    # ------------------------------------------------------------------ stages 4-6: denoising
    def denoise_sequence(
        self,
        specs: list[FrameSpec],
        noise: torch.Tensor,
        text: torch.Tensor,
        controller: MorphController,
        config: MorphConfig,
        stage: str,
        progress: ProgressCallback | None,
        emitter: _FrameEmitter,
        stop: StopCheck = never_stop,
        walk_steps: int | None = None,
    ) -> torch.Tensor:
        """Every frame of the sequence, (N, 3, H, W) in [0, 1]: the K endpoints reconstructed
        from their z_T (storing their self-attention inputs) and the intermediate frames, each
        sample with its own alpha. Rows are the K endpoints first, then the frames, cut into
        batches of `frame_batch_size`: the endpoints ride in the first batch with the frames
        (their store at each layer and step is written before the frames of the same call read
        it), so they cost no pass of their own. `walk_steps`: a coarse walk (ddim_sample)."""
        num_images = len(noise)
        rows: list[int | FrameSpec] = [*range(num_images), *(s for s in specs if 0.0 < s.alpha < 1.0)]
        decoded_images: dict[int, torch.Tensor] = {}
        frames: dict[int, torch.Tensor] = {}
        intermediate_total, done = len(rows) - num_images, 0
        for chunk in _chunks(rows, config.frame_batch_size):
            images = [row for row in chunk if isinstance(row, int)]
            frame_specs = [row for row in chunk if isinstance(row, FrameSpec)]
            weights = (torch.stack([_segment_weights(s.segment, s.alpha, num_images) for s in frame_specs])
                       if frame_specs else torch.zeros(0, num_images))
            lora_parts = [self._endpoint_lora_weights(images, num_images, config) if images else None,
                          self._frame_lora_weights(frame_specs, num_images, config) if frame_specs else None]
            lora_weights = None if config.lora_mode == "none" else torch.cat([w for w in lora_parts if w is not None])
            self._set_batch(controller, MODE_REPLACE if frame_specs else MODE_STORE, weights, lora_weights,
                            image_indices=images or None)
            start = torch.cat([noise[images], *(
                interpolate_latents(noise[s.segment : s.segment + 1], noise[s.segment + 1 : s.segment + 2],
                                    torch.tensor([s.alpha]), config.use_adain)
                for s in frame_specs
            )])
            batch_text = torch.cat([text[images], torch.einsum("bk,kld->bld", weights.to(text), text)])
            latents = ddim_sample(
                self.models.schedule, self._predictor(controller, batch_text, stop, stage), start,
                config.num_inference_steps, walk_steps=walk_steps,
            )
            decoded = self.decode(latents)
            decoded_images |= dict(zip(images, decoded[: len(images)]))
            for spec, frame in zip(frame_specs, decoded[len(images):]):
                frames[spec.index] = frame
            if len(decoded_images) == num_images:  # the endpoints are in, so are frames so far
                for spec in specs:
                    if not 0.0 < spec.alpha < 1.0:
                        frames.setdefault(spec.index, decoded_images[spec.segment + (1 if spec.alpha >= 1.0 else 0)])
                for index in sorted(frames):
                    if index not in emitter.ready:
                        emitter.add(index, frames[index])
            done += len(frame_specs)
            if progress and frame_specs:
                progress(ProgressEvent(stage=stage, step=done, total=intermediate_total))
        return torch.stack([frames[index] for index in sorted(frames)])

    # ------------------------------------------------------------------ stage 6: reschedule
    def perceptual_metric(self, config: MorphConfig) -> PerceptualDistance:
        """The distance that drives the reschedule. "lpips" is the loaded LPIPS-AlexNet (or its
        logged fallback when its weights are missing); "pixel" is asked for explicitly."""
        if config.perceptual_metric == "pixel":
            return PixelDistance()
        if self.perceptual is None:
            self.perceptual = load_perceptual("lpips", None, self.models.device)
        return self.perceptual

    def reschedule(
        self,
        frames: torch.Tensor,
        alphas: list[float],
        num_images: int,
        metric: PerceptualDistance,
    ) -> list[list[float]]:
        """Per segment, alphas that even out the perceptual distance between the frames that
        the first pass made at `alphas`."""
        per_segment = []
        step = len(alphas) - 1
        for segment in range(num_images - 1):
            segment_frames = frames[segment * step : segment * step + len(alphas)]
            distances = consecutive_distances(segment_frames, metric)
            per_segment.append(reschedule_alphas(alphas, distances.tolist()))
        return per_segment

    def _schedule_key(self, keys: Sequence[CacheKeys], config: MorphConfig, metric: PerceptualDistance) -> str | None:
        """The cache key of this morph's rescheduled alphas; None where some image's latent is
        not cached (a caller-given LoRA, fixed-LoRA mode) or there is no cache."""
        if self.cache is None or not keys or any(key.latent is None for key in keys):
            return None
        options = config.to_dict()
        options.pop("frame_batch_size")  # how the work is cut into batches, not what it computes
        return schedule_cache_key([key.latent for key in keys], options, f"{metric.name}:{metric.identity}")  # type: ignore[misc]

    def _cached_schedule(self, key: str | None, num_images: int, num_frames: int) -> list[list[float]] | None:
        """The cached alphas under `key`, if present and of this morph's shape."""
        entry = self.cache.load(key) if key and self.cache is not None else None
        alphas = entry.get("alphas") if entry else None
        if alphas is None or tuple(alphas.shape) != (num_images - 1, num_frames):
            return None
        return [[float(a) for a in row] for row in alphas.tolist()]

    # ------------------------------------------------------------------ helpers
    def _predictor(
        self, controller: MorphController, text: torch.Tensor, stop: StopCheck, stage: str
    ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """The UNet call of one denoising step; asks `stop` first, so a morph stops within one
        UNet call of a deadline or cancellation."""
        unet = self.models.unet

        def predict(latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
            raise_if_stopped(stop, stage)
            controller.step = step_index
            return unet(latents, timestep, encoder_hidden_states=text).sample

        return predict

    @staticmethod
    def _set_batch(
        controller: MorphController,
        mode: str,
        weights: torch.Tensor,
        lora_weights: torch.Tensor | None,
        image_indices: list[int] | None = None,
    ) -> None:
        controller.mode = mode
        controller.weights = weights
        controller.lora_weights = lora_weights
        controller.image_indices = image_indices

    @staticmethod
    def _endpoint_lora_weights(
        images: list[int], num_images: int, config: MorphConfig
    ) -> torch.Tensor | None:
        """LoRA mix used to invert and reconstruct image i: its own LoRA, or in fixed mode the
        fixed mix of the segment it starts (the last image: the segment it ends)."""
        if config.lora_mode == "none":
            return None
        if config.lora_mode == "interpolate":
            return _one_hot(images, num_images)
        fixed = float(config.fixed_lora_alpha or 0.0)
        return torch.stack([_segment_weights(min(i, num_images - 2), fixed, num_images) for i in images])

    @staticmethod
    def _frame_lora_weights(
        specs: list[FrameSpec], num_images: int, config: MorphConfig
    ) -> torch.Tensor | None:
        if config.lora_mode == "none":
            return None
        fixed = config.fixed_lora_alpha
        return torch.stack([
            _segment_weights(s.segment, s.alpha if fixed is None else fixed, num_images) for s in specs
        ])


# ---------------------------------------------------------------------- module helpers
def _one_hot(indices: list[int], num_images: int) -> torch.Tensor:
    weights = torch.zeros(len(indices), num_images)
    weights[torch.arange(len(indices)), torch.tensor(indices)] = 1.0
    return weights


def _segment_weights(segment: int, alpha: float, num_images: int) -> torch.Tensor:
    """Weights over the K images for a point of segment k: (1 - alpha) on k, alpha on k+1."""
    weights = torch.zeros(num_images)
    weights[segment] = 1.0 - alpha
    weights[segment + 1] += alpha
    return weights


def _specs(num_images: int, alphas: list[float]) -> list[FrameSpec]:
    return _specs_per_segment([alphas] * (num_images - 1))


def _specs_per_segment(per_segment: list[list[float]]) -> list[FrameSpec]:
    """Frame specs of the concatenated sequence; joints appear once (as alpha 1 of a segment
    they are skipped, being alpha 0 of the next)."""
    specs: list[FrameSpec] = []
    for segment, alphas in enumerate(per_segment):
        last = segment == len(per_segment) - 1
        for alpha in alphas if last else alphas[:-1]:
            specs.append(FrameSpec(segment, float(alpha), len(specs)))
    return specs


def _flatten(per_segment: list[list[float]]) -> tuple[list[float], list[int]]:
    specs = _specs_per_segment(per_segment)
    return [s.alpha for s in specs], [s.segment for s in specs]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _timed:
    """Adds the wall time of a `with` block to timings[name]."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.timings[self.name] = self.timings.get(self.name, 0.0) + elapsed
