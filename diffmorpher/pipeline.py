"""DiffMorpherPipeline: the paper's algorithm as numbered stages.

    0. check inputs; with one image and K >= 2 prompts, make the K-1 other endpoints from it
       (endpoints.py: the image-to-image pass of the base model, cached like an input image)
    1. encode images and prompts       (one preprocessing for every stage; conditioning.py)
    2. fit one LoRA per image          (lora.py, peft), or one for all (shared_lora)
    3. DDIM-invert each image          (ddim.py, with its own LoRA mix loaded)
    4. reschedule: a measuring pass at uniform alphas (a coarse walk over `reschedule_probe_fraction`
       of the DDIM steps); alphas that make the perceptual distance between frames even (reschedule.py)
    5. denoise the endpoints, storing up-block self-attention inputs   (attention.py), in the
       same batches (batching.py) as
    6. the intermediate frames, each sample with its own alpha: slerp + AdaIN latents, mixed
       prompt conditioning, per-sample LoRA mix, interpolated attention; reported in order
       as they finish (emission.py)

What the cache holds and gets (LoRAs, latents, input images, schedules) is cache_plan.py's.
K >= 2 images give K-1 segments; image k is the alpha = 1 end of segment k-1 and the alpha = 0 end
of segment k, so its LoRA, inverted latent and stored attention are computed once and shared.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from morph_protocol import limits
from PIL import Image

from .attention import AttentionStore, MorphController, morph_attention
from .batching import (
    RESERVE_BYTES,
    Batch,
    FrameSpec,
    activation_bytes,
    chunks,
    decode_bytes,
    frame_batch_size,
    frame_specs,
    inversion_batches,
    rows_per_call,
    sequence_batches,
)
from .cache import TensorCache
from .cache_plan import CachePlan, Lora, Schedule, generated_endpoints, stored_image
from .conditioning import PromptConditioning
from .config import AUTO, DEFAULT_VAE_BATCH, ConfigError, MorphConfig
from .ddim import Predictor, ddim_invert, ddim_sample
from .devices import is_out_of_memory, release_cached_memory, resolve_dtype, select_device, synchronize
from .emission import FrameCollector
from .endpoints import UNCONDITIONAL_PROMPT, generate_endpoint_latents
from .interrupt import StopCheck, never_stop, raise_if_stopped
from .lora import fit_loras, fit_shared_lora
from .lora_file import check_lora_ranks, lora_module_shapes, read_lora
from .lora_mix import LoraStack, build_lora_stacks
from .models import MorphModels, load_morph_models
from .perceptual import PerceptualDistance, PixelDistance, consecutive_distances, load_perceptual
from .preprocess import image_to_tensor, tensor_to_images
from .reschedule import reschedule_alphas, uniform_alphas
from .transfer import row_index
from .results import (
    STAGE_ENDPOINTS,
    STAGE_FRAMES,
    STAGE_INVERSION,
    STAGE_LORA,
    STAGE_RESCHEDULE,
    MorphResult,
    ProgressCallback,
    ProgressEvent,
    WorkDone,
)

logger = logging.getLogger(__name__)


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
        self.cache = cache  # fitted LoRAs, inverted latents, input images, schedules by content key

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        dtype: str = AUTO,
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
        loras: Sequence[Lora | None] | None = None,
        progress: ProgressCallback | None = None,
        stop: StopCheck = never_stop,
    ) -> MorphResult:
        """`stop` is asked between steps whether to go on (deadline, cancelled client); when it
        says stop, MorphStopped is raised and the UNet is left as it was. One image with K >= 2
        prompts: the other K-1 endpoints are made from it first (`generate_endpoints`) and
        returned in the result's `generated`."""
        config = config or MorphConfig()
        # 0. check inputs
        self.check_inputs(images, prompts, config, loras)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        resolution = config.resolution or self.models.native_resolution
        config = config.replace(frame_batch_size=self.frame_batch_size(config, resolution))
        device = self.models.device
        generated: list[Image.Image] = []
        endpoint_cache: list[str] = []
        if len(images) == 1:  # 0b. one image, K prompts: make the other endpoints (base model, no LoRA yet)
            with torch.no_grad(), _timed(timings, STAGE_ENDPOINTS, device):
                generated, endpoint_cache = self.generate_endpoints(images[0], prompts, config, resolution, progress, stop)
            images = [images[0], *generated]
        plan = CachePlan.for_morph(self.cache, images, prompts, self.models, config, resolution, loras)
        work = WorkDone()
        with torch.no_grad():
            # 1. encode images and prompts
            with _timed(timings, "encode", device):
                conditioning = self.encode_prompts(prompts, resolution)
                latent_mean, latent_std = self.encode_images(images, resolution, config.vae_batch_size)
            plan.remember_images(images, resolution)
            # 2. fit one LoRA per image
            with _timed(timings, STAGE_LORA, device):
                fitted = self.fit_loras(
                    latent_mean, latent_std, conditioning, config, loras, progress, stop, plan, work
                )
            controller = MorphController(AttentionStore(len(images), config.num_attn_replace_steps), beta=config.attn_beta)
            # Inference only from here on (the LoRA fit above needs autograd): no version
            # counters or view tracking on any tensor the denoising makes.
            with torch.inference_mode(), morph_attention(self.models.unet, controller, self.lora_stacks(fitted, config)):
                # 3. DDIM-invert every image with its own LoRA mix
                with _timed(timings, STAGE_INVERSION, device):
                    noise = self.invert(latent_mean, conditioning, controller, config, progress, stop, plan, work)
                # 4. reschedule: alphas that even out the perceptual distance between frames
                metric: PerceptualDistance | None = None
                schedule, schedule_state = [uniform_alphas(config.num_frames)] * (len(images) - 1), "off"
                if config.use_reschedule:
                    with _timed(timings, STAGE_RESCHEDULE, device):
                        metric = self.perceptual_metric(config)
                        measure = partial(self.reschedule, noise, conditioning, controller, config, metric, progress, stop)
                        schedule, schedule_state = plan.schedule(config, metric, len(images), measure)
                # 5-6. endpoints (storing attention) and frames, reported in order as they finish
                with _timed(timings, STAGE_FRAMES, device):
                    frames = self.denoise_sequence(
                        frame_specs(schedule), noise, conditioning, controller, config, STAGE_FRAMES, progress, stop,
                        stream=True, to_cpu=True,
                    )
        timings["total"] = time.perf_counter() - started
        specs = frame_specs(schedule)
        return MorphResult(
            frames=tensor_to_images(frames),
            frame_tensors=frames,
            alphas=[spec.alpha for spec in specs],
            segments=[spec.segment for spec in specs],
            loras=list(fitted),
            latents=list(noise.float().cpu().split(1)),  # one copy to the host
            timings=timings,
            perceptual_metric=metric.name if metric else "none",
            perceptual_weights=metric.weights if metric else "",
            seed=config.seed,
            resolution=resolution,
            cache=plan.report(),
            schedule_cache=schedule_state,
            device=str(device),
            dtype=str(self.models.dtype).removeprefix("torch."),
            frame_batch_size=config.frame_batch_size,
            work=work,
            generated=generated,
            endpoint_cache=endpoint_cache,
        )

    # ------------------------------------------------------------------ stage 0: checks
    def check_inputs(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        config: MorphConfig,
        loras: Sequence[Lora | None] | None,
    ) -> None:
        if len(images) == 1 and len(prompts) >= limits.MIN_ONE_IMAGE_PROMPTS:
            if len(prompts) > limits.MAX_ONE_IMAGE_PROMPTS:
                raise ConfigError(
                    f"one image takes at most {limits.MAX_ONE_IMAGE_PROMPTS} prompts (its own, then one per "
                    f"endpoint to make), got {len(prompts)}"
                )
        elif not limits.MIN_IMAGES <= len(images) <= limits.MAX_IMAGES:
            raise ConfigError(
                f"need between {limits.MIN_IMAGES} and {limits.MAX_IMAGES} images, got {len(images)} (or one image "
                f"and {limits.MIN_ONE_IMAGE_PROMPTS} to {limits.MAX_ONE_IMAGE_PROMPTS} prompts)"
            )
        elif len(prompts) != len(images):
            raise ConfigError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if loras is not None and len(loras) != len(prompts):
            raise ConfigError(f"need one LoRA (or None) per endpoint, got {len(loras)}")
        if config.lora_mode == "shared" and loras is not None and any(lora is not None for lora in loras):
            raise ConfigError("shared_lora fits one LoRA on all the images; it cannot be combined with given LoRAs")
        if loras is not None and any(lora is not None for lora in loras):
            if config.lora_mode == "none":
                raise ConfigError("LoRAs were sent but use_lora is false; send them with use_lora true, or none")
            check_lora_ranks(list(loras), config.lora_rank if any(lora is None for lora in loras) else None)
        multiple = self.models.vae_scale_factor * 2 ** (len(self.models.unet.config.down_block_types) - 1)
        resolution = config.resolution or self.models.native_resolution
        if resolution % multiple:
            raise ConfigError(f"resolution must be a multiple of {multiple} for this model, got {resolution}")
        if self.models.device.type == "cpu" and self.models.dtype == torch.float16:
            raise ConfigError("float16 is not supported on CPU")

    def frame_batch_size(self, config: MorphConfig, resolution: int) -> int:
        """Rows per UNet call for this morph (batching.frame_batch_size): with the auto setting,
        what the device's free memory holds at the UNet's estimated activations per sample, after
        a reserve that includes one VAE slice's decode (docs/sizing.md "Frame batch on a GPU")."""
        models = self.models
        per_sample = activation_bytes(
            int(models.unet.config.block_out_channels[0]), resolution // models.vae_scale_factor, models.dtype.itemsize
        )
        vae_channels = int(models.vae.config.block_out_channels[0])
        vae_slice = config.vae_batch_size * decode_bytes(vae_channels, resolution, models.vae.dtype.itemsize)
        return frame_batch_size(config, models.device, per_sample, RESERVE_BYTES + vae_slice)

    # ------------------------------------------------------------------ stage 1: encode
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> PromptConditioning:
        """One row of UNet conditioning per prompt, as the model family makes it."""
        return self.models.conditioner.encode(prompts, resolution or self.models.native_resolution)

    def encode_images(
        self, images: Sequence[Image.Image], resolution: int, vae_batch_size: int = DEFAULT_VAE_BATCH
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of each image, scaled like the latents the UNet sees;
        `vae_batch_size` images per VAE call (the encoder's full-resolution maps are large)."""
        vae = self.models.vae  # float32 where its config forces an upcast of float16 (models.vae_dtype)
        scale = vae.config.scaling_factor
        means, stds = [], []
        for chunk in chunks(list(images), vae_batch_size):
            pixels = torch.cat([image_to_tensor(image, resolution) for image in chunk])
            posterior = vae.encode(pixels.to(device=self.models.device, dtype=vae.dtype)).latent_dist
            means.append((posterior.mean * scale).to(self.models.dtype))
            stds.append((posterior.std * scale).to(self.models.dtype))
        return torch.cat(means), torch.cat(stds)

    def decode(self, latents: torch.Tensor, vae_batch_size: int = DEFAULT_VAE_BATCH) -> torch.Tensor:
        """Latents -> (B, 3, H, W) float32 images in [0, 1] on the run device, `vae_batch_size`
        per VAE call: the decoder's full-resolution activations bound a frame batch's memory.
        The reschedule's LPIPS reads them there; the result's frames go to the CPU once, where
        they are collected (emission.FrameCollector)."""
        vae = self.models.vae
        scale = vae.config.scaling_factor
        slices = [vae.decode(part.to(vae.dtype) / scale).sample for part in latents.split(vae_batch_size)]
        return ((torch.cat(slices).float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ stage 0b: endpoints from one image
    def generate_endpoints(
        self,
        image: Image.Image,
        prompts: Sequence[str],
        config: MorphConfig,
        resolution: int,
        progress: ProgressCallback | None = None,
        stop: StopCheck = never_stop,
    ) -> tuple[list[Image.Image], list[str]]:
        """The endpoints for prompts 1..K-1, made from `image` (prompt 0's) by the base model's
        image-to-image pass (endpoints.py), at the model resolution; read from the cache where
        made before (cache_plan.generated_endpoints). Also: per endpoint "hit", "miss" or "off"."""

        def generate(indices: list[int]) -> dict[int, Image.Image]:
            conditioning = self.encode_prompts([prompts[0], *(prompts[i] for i in indices), UNCONDITIONAL_PROMPT],
                                               resolution)
            latent, _ = self.encode_images([image], resolution, config.vae_batch_size)

            def on_step(step: int, total: int) -> None:
                if progress:
                    progress(ProgressEvent(stage=STAGE_ENDPOINTS, step=step, total=total))

            latents = generate_endpoint_latents(
                self.models.unet, self.models.schedule, latent, conditioning.select([0]),
                conditioning.select(range(1, len(indices) + 1)), conditioning.select([len(indices) + 1]),
                config, stop, on_step,
            )
            return dict(zip(indices, tensor_to_images(self.decode(latents, config.vae_batch_size))))

        return generated_endpoints(self.cache, image, prompts, self.models, config, resolution, generate, stop)

    def read_lora(self, data: bytes, field: str | None = None) -> Lora:
        """A LoRA sent as safetensors (diffusers' format, as a result's LoRA part), checked
        against this model's UNet (lora_file.read_lora); pass it as `loras[i]` to skip a fit."""
        return read_lora(data, lora_module_shapes(self.models.unet), field=field)

    def stored_image(self, key: str) -> Image.Image:
        """The input image a previous result named by its `image_key` (cache_plan.stored_image)."""
        return stored_image(self.cache, key)

    # ------------------------------------------------------------------ stage 2: LoRAs
    def fit_loras(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        conditioning: PromptConditioning,
        config: MorphConfig,
        given: Sequence[Lora | None] | None,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        plan: CachePlan | None = None,
        work: WorkDone | None = None,
    ) -> list[Lora | None]:
        """One LoRA per image: a given one, else the cache's, else fitted (and cached). None in
        no-LoRA mode; with shared_lora the one LoRA of all the images, for each of them. Missing
        LoRAs are fitted together, `frame_batch_size` images per UNet call (lora.fit_loras).
        `work` counts the fits and optimizer steps run."""
        work = work if work is not None else WorkDone()
        if config.lora_mode == "none":
            return [None] * len(latent_mean)
        if config.lora_mode == "shared":
            shared = self.fit_shared_lora(latent_mean, latent_std, conditioning, config, progress, stop, plan, work)
            return [shared] * len(latent_mean)
        fitted: dict[int, Lora] = {index: lora for index, lora in enumerate(given or []) if lora is not None}
        todo = [index for index in range(len(latent_mean)) if index not in fitted]

        def fit_chunk(chunk: list[int]) -> list[Lora]:
            def on_step(step: int, total: int, losses: torch.Tensor) -> None:
                raise_if_stopped(stop, STAGE_LORA)
                work.lora_steps += len(chunk)
                if progress:
                    for item in chunk:
                        progress(ProgressEvent(stage=STAGE_LORA, step=step, total=total, item=item))

            loras = fit_loras(
                self.models.unet, self.models.schedule, latent_mean[row_index(chunk)], latent_std[row_index(chunk)],
                conditioning.select(chunk), config, seed=config.seed, on_step=on_step,
            )
            work.lora_fits += len(chunk)
            return loras

        def fit(indices: list[int]) -> dict[int, Lora]:
            new: dict[int, Lora] = {}
            parts = chunks(indices, rows_per_call(config))
            for chunk, loras in self._split_on_oom(parts, fit_chunk, len, _split_list, "LoRA fit"):
                new |= dict(zip(chunk, loras))
            return new

        fitted |= (plan or CachePlan(None)).loras(todo, fit, stop)
        return [fitted[index] for index in range(len(latent_mean))]

    def fit_shared_lora(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        conditioning: PromptConditioning,
        config: MorphConfig,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        plan: CachePlan | None = None,
        work: WorkDone | None = None,
    ) -> Lora:
        """One LoRA fitted on all the images (lora.fit_shared_lora), the cache's where it holds
        it. Its steps run `frame_batch_size` images per UNet call; a step that runs out of device
        memory restarts the fit at half as many (the fit is deterministic, so the result is the
        same up to rounding). `work` counts one fit and its optimizer steps."""
        work = work if work is not None else WorkDone()

        def on_step(step: int, total: int, losses: torch.Tensor) -> None:
            raise_if_stopped(stop, STAGE_LORA)
            work.lora_steps += 1
            if progress:
                progress(ProgressEvent(stage=STAGE_LORA, step=step, total=total, item=0))

        def fit() -> Lora:
            rows, steps_before = min(rows_per_call(config), len(latent_mean)), work.lora_steps
            while True:
                try:
                    lora = fit_shared_lora(
                        self.models.unet, self.models.schedule, latent_mean, latent_std, conditioning, config,
                        seed=config.seed, rows_per_call=rows, on_step=on_step,
                    )
                except Exception as error:  # noqa: BLE001 - only an out-of-memory error is retried
                    if not is_out_of_memory(error) or rows == 1:
                        raise
                    release_cached_memory(self.models.device)
                    logger.warning("a shared LoRA fit of %d rows per call ran out of memory; restarting at %d",
                                   rows, (rows + 1) // 2)
                    rows, work.lora_steps = (rows + 1) // 2, steps_before
                    continue
                work.lora_fits += 1
                return lora

        return (plan or CachePlan(None)).shared_lora(fit, stop)

    def lora_stacks(self, fitted: list[Lora | None], config: MorphConfig) -> dict[str, LoraStack] | None:
        """The K LoRAs by module, on the run device, for per-sample mixing (the shared LoRA
        once, applied to every row as it is); None without LoRAs."""
        if config.lora_mode == "none":
            return None
        if config.lora_mode == "shared":
            fitted = fitted[:1]
        return build_lora_stacks(fitted, self.models.device, self.models.dtype)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ stage 3: inversion
    def invert(
        self,
        latent_mean: torch.Tensor,
        conditioning: PromptConditioning,
        controller: MorphController,
        config: MorphConfig,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        plan: CachePlan | None = None,
        work: WorkDone | None = None,
    ) -> torch.Tensor:
        """z_T of each image (K, C, h, w), from its posterior mean, with its endpoint LoRA mix;
        read from the cache where an image's latent is there (and cached when computed);
        `work` counts the images inverted."""
        plan = plan or CachePlan(None)
        work = work if work is not None else WorkDone()
        num_images = len(latent_mean)
        results = plan.cached_latents(latent_mean)
        missing = [index for index in range(num_images) if index not in results]

        def run(batch: Batch) -> torch.Tensor:
            batch = batch.on(self.models.device, self.models.dtype)  # once per batch, not per layer
            batch.apply(controller)

            def on_step(step: int, total: int, item: int = batch.images[0]) -> None:
                if progress:
                    progress(ProgressEvent(stage=STAGE_INVERSION, step=step, total=total, item=item))

            return ddim_invert(
                self.models.schedule, self._predictor(controller, batch.conditioning(conditioning), stop, STAGE_INVERSION),
                latent_mean[row_index(batch.images)], config.num_inference_steps, on_step,
            )

        batches = inversion_batches(missing, num_images, config)
        for batch, inverted in self._split_on_oom(batches, run, _batch_rows, Batch.split, "inversion batch"):
            work.inversions += len(batch.images)
            for index, latent in zip(batch.images, inverted):
                results[index] = latent
                plan.save_latent(index, latent)
        return torch.stack([results[index] for index in range(num_images)])

    # ------------------------------------------------------------------ stage 4: reschedule
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
        noise: torch.Tensor,
        conditioning: PromptConditioning,
        controller: MorphController,
        config: MorphConfig,
        metric: PerceptualDistance,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
    ) -> Schedule:
        """Per segment, alphas that even out the perceptual distance between the frames of a
        measuring pass at uniform alphas (a coarse walk: `reschedule_probe_fraction` of the
        steps, ddim.StepPlan.coarse)."""
        num_images, alphas = len(noise), uniform_alphas(config.num_frames)
        probe = self.denoise_sequence(
            frame_specs([alphas] * (num_images - 1)), noise, conditioning, controller, config, STAGE_RESCHEDULE,
            progress, stop, walk_steps=config.reschedule_probe_steps,
        )
        step = len(alphas) - 1
        schedule = []
        for segment in range(num_images - 1):
            distances = consecutive_distances(probe[segment * step : segment * step + len(alphas)], metric)
            schedule.append(reschedule_alphas(alphas, distances.tolist()))
        return schedule

    # ------------------------------------------------------------------ stages 5-6: endpoints and frames
    def denoise_sequence(
        self,
        specs: list[FrameSpec],
        noise: torch.Tensor,
        conditioning: PromptConditioning,
        controller: MorphController,
        config: MorphConfig,
        stage: str,
        progress: ProgressCallback | None,
        stop: StopCheck = never_stop,
        walk_steps: int | None = None,
        stream: bool = False,
        to_cpu: bool = False,
    ) -> torch.Tensor:
        """Every frame of the sequence, (N, 3, H, W) in [0, 1]: the K endpoints reconstructed
        from their z_T (storing their self-attention inputs) and the intermediate frames, each
        sample with its own alpha, in the batches of batching.sequence_batches. `walk_steps`: a
        coarse walk (ddim_sample). `stream`: report each frame, in order, as it is ready.
        `to_cpu`: collect the frames on the CPU (the result), else on the run device."""
        collector = FrameCollector(specs, len(noise), stage, progress, stream, to_cpu)

        def run(batch: Batch) -> torch.Tensor:
            batch = batch.on(self.models.device, self.models.dtype)  # once per batch, not per layer
            batch.apply(controller)
            latents = ddim_sample(
                self.models.schedule, self._predictor(controller, batch.conditioning(conditioning), stop, stage),
                batch.start_latents(noise, config.use_adain), config.num_inference_steps, walk_steps=walk_steps,
            )
            return self.decode(latents, config.vae_batch_size)

        for batch, decoded in self._split_on_oom(sequence_batches(specs, len(noise), config), run, _batch_rows,
                                                 Batch.split, "frame batch"):
            collector.add(batch, decoded)
        return collector.tensor()

    def _split_on_oom(
        self, parts: Iterable[Part], run: Callable[[Part], Out], rows: Callable[[Part], int],
        split: Callable[[Part, int], list[Part]], what: str,
    ) -> Iterator[tuple[Part, Out]]:
        """Each part (a frame or inversion batch, a chunk of images to fit) with `run`'s result.
        A part that runs out of device memory is not the morph's end while it can be split: the
        cached memory is released, the part halved and retried (down to one row), and the rest of
        the stage runs at the size that fit. Every row's result depends on its own inputs alone
        (batching.Batch.split, lora.fit_loras' per-image generators), so a split part computes
        what the whole would have."""
        limit: int | None = None
        for whole in parts:
            pending = [whole]
            while pending:
                part = pending.pop(0)
                if limit is not None and rows(part) > limit:
                    pending[:0] = split(part, limit)
                    continue
                try:
                    result = run(part)
                except Exception as error:  # noqa: BLE001 - only an out-of-memory error is retried
                    if not is_out_of_memory(error) or rows(part) == 1:
                        raise
                else:
                    yield part, result
                    continue
                # Out of memory; released here, where the error's traceback no longer holds the part's tensors.
                release_cached_memory(self.models.device)
                limit = (rows(part) + 1) // 2
                logger.warning("a %s of %d rows ran out of memory; retrying %d at a time", what, rows(part), limit)
                pending.insert(0, part)

    # ------------------------------------------------------------------ the UNet call
    def _predictor(
        self, controller: MorphController, conditioning: PromptConditioning, stop: StopCheck, stage: str
    ) -> Predictor:
        """The UNet call of one denoising step; asks `stop` first, so a morph stops within one
        UNet call of a deadline or cancellation."""
        unet, unet_kwargs = self.models.unet, conditioning.unet_kwargs()

        def predict(latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
            raise_if_stopped(stop, stage)
            controller.step = step_index
            return unet(latents, timestep, **unet_kwargs).sample

        return predict


Part = TypeVar("Part")
Out = TypeVar("Out")


def _batch_rows(batch: Batch) -> int:
    return batch.rows


def _split_list(items: list[int], size: int) -> list[list[int]]:
    return list(chunks(items, size))


class _timed:
    """Adds the wall time of a `with` block to timings[name]: the time of the block's device
    work, too, since the device is synchronised at both ends (an accelerator runs kernels
    asynchronously, so without it a stage's time would land in whichever stage waits next)."""

    def __init__(self, timings: dict[str, float], name: str, device: torch.device) -> None:
        self.timings, self.name, self.device = timings, name, device

    def __enter__(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        elapsed = time.perf_counter() - self.start
        self.timings[self.name] = self.timings.get(self.name, 0.0) + elapsed
