"""One morph's use of the cache: its content keys, what was found, and what gets stored.

Per input image the morph has three entries: the fitted LoRA, the DDIM-inverted latent and the
image as the model saw it (which a later request may name instead of sending it); per morph,
the rescheduled alphas. The pipeline's stages ask this plan for hits and hand it what they
computed; without a cache every question answers "compute it" and nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .cache import KEY as CACHE_KEY
from .cache import CacheKeys, CacheMiss, TensorCache
from .config import ConfigError, MorphConfig, show
from .interrupt import StopCheck, never_stop
from .lora import endpoint_cache_key, image_cache_key, inversion_cache_key, lora_cache_key, shared_lora_cache_key
from .models import MorphModels
from .perceptual import PerceptualDistance
from .preprocess import to_model_square
from .reschedule import schedule_cache_key

Lora = dict[str, torch.Tensor]
Schedule = list[list[float]]  # per segment, the alphas of its frames


@dataclass
class CachePlan:
    """The cache (or None) and the keys of one morph's images (empty without a cache)."""

    cache: TensorCache | None
    keys: list[CacheKeys] = field(default_factory=list)

    @classmethod
    def for_morph(
        cls,
        cache: TensorCache | None,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        models: MorphModels,
        config: MorphConfig,
        resolution: int,
        given: Sequence[Lora | None] | None = None,
    ) -> CachePlan:
        """Per image, the content keys of its LoRA and its inverted latent: no LoRA key where the
        caller gave the LoRA, no latent key where the inversion depends on another image's LoRA
        (fixed-LoRA mode) or on a given LoRA. With a shared LoRA every image has the one key of
        the whole image set (lora.shared_lora_cache_key), and its latent is keyed by it."""
        if cache is None:
            return cls(None)
        model_identity = models.identity  # hashes the weights once: only asked with a cache
        shared = None
        if config.lora_mode == "shared":
            shared = shared_lora_cache_key(images, prompts, model_identity, config, resolution)
        keys = []
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            lora = shared
            if config.lora_mode in ("interpolate", "fixed") and not (given is not None and given[index] is not None):
                lora = lora_cache_key(image, prompt, model_identity, config, resolution)
            latent = None
            if config.lora_mode == "none" or (config.lora_mode in ("interpolate", "shared") and lora):
                latent = inversion_cache_key(image, prompt, model_identity, config, resolution, lora)
            keys.append(CacheKeys(lora, latent, image_cache_key(image, resolution)))
        return cls(cache, keys)

    def report(self) -> list[dict[str, str | None]]:
        """Per image, for the result: hits, misses and keys (CacheKeys.report)."""
        return [key.report() for key in self.keys]

    def remember_images(self, images: Sequence[Image.Image], resolution: int) -> None:
        """Keep each image as the model saw it, under its image key, so a later request can
        name it instead of sending it (`stored_image`)."""
        if self.cache is None:
            return
        for image, key in zip(images, self.keys):
            if key.image and self.cache.load(key.image) is None:
                pixels = torch.from_numpy(np.asarray(to_model_square(image, resolution), dtype=np.uint8).copy())
                self.cache.save(key.image, {"pixels": pixels})

    def loras(
        self, indices: list[int], fit: Callable[[list[int]], dict[int, Lora]], stop: StopCheck = never_stop
    ) -> dict[int, Lora]:
        """The LoRAs of `indices`: read where cached, else fitted by `fit` (all missing ones in
        one call) and cached, under their keys' locks, so a worker that needs a LoRA another
        worker is fitting waits for it and reads it; `stop` ends that wait at the request's
        deadline or cancellation (MorphStopped)."""
        if self.cache is None or not self.keys:
            return fit(indices)
        index_of = {self.keys[index].lora: index for index in indices}

        def fit_missing(missing: list[str]) -> dict[str, Lora]:
            new = fit([index_of[key] for key in missing])
            return {key: new[index_of[key]] for key in missing}

        loras, hits = self.cache.get_or_compute_many([self.keys[index].lora for index in indices], fit_missing, stop)  # type: ignore[misc]
        for index in indices:
            self.keys[index].lora_hit = self.keys[index].lora in hits
        return {index: loras[self.keys[index].lora] for index in indices}  # type: ignore[index]

    def shared_lora(self, fit: Callable[[], Lora], stop: StopCheck = never_stop) -> Lora:
        """The shared LoRA of all the images: read where cached, else fitted by `fit` and cached
        under its key's lock (a worker fitting the same set makes the others wait and read;
        `stop` ends that wait at the request's deadline or cancellation)."""
        if self.cache is None or not self.keys or self.keys[0].lora is None:
            return fit()
        lora, hit = self.cache.get_or_compute(self.keys[0].lora, fit, stop)
        for key in self.keys:
            key.lora_hit = hit
        return lora

    def cached_latents(self, like: torch.Tensor) -> dict[int, torch.Tensor]:
        """The inverted latents the cache holds, by image index, on `like`'s device and dtype."""
        found: dict[int, torch.Tensor] = {}
        if self.cache is None:
            return found
        for index, key in enumerate(self.keys):
            entry = self.cache.load(key.latent) if key.latent else None
            if entry is not None:
                found[index] = entry["latent"].to(device=like.device, dtype=like.dtype)
                key.latent_hit = True
        return found

    def save_latent(self, index: int, latent: torch.Tensor) -> None:
        key = self.keys[index].latent if self.keys else None
        if self.cache is not None and key:
            self.cache.save(key, {"latent": latent})

    def schedule(
        self, config: MorphConfig, metric: PerceptualDistance, num_images: int, measure: Callable[[], Schedule]
    ) -> tuple[Schedule, str]:
        """The rescheduled alphas and "hit", "miss" or "off": read from the cache, else
        `measure`d (the measuring pass) and cached. Off where some image's latent is not cached
        (a caller-given LoRA, fixed-LoRA mode) or there is no cache."""
        key = self._schedule_key(config, metric)
        cached = self._cached_schedule(key, num_images, config.num_frames)
        if cached is not None:
            return cached, "hit"
        alphas = measure()
        if key is not None and self.cache is not None:
            self.cache.save(key, {"alphas": torch.tensor(alphas, dtype=torch.float64)})
        return alphas, "off" if key is None else "miss"

    def _schedule_key(self, config: MorphConfig, metric: PerceptualDistance) -> str | None:
        if self.cache is None or not self.keys or any(key.latent is None for key in self.keys):
            return None
        options = config.to_dict()
        # how the work is cut into batches and what the result carries, not what it computes
        for name in ("frame_batch_size", "vae_batch_size", "return_loras"):
            options.pop(name)
        return schedule_cache_key([key.latent for key in self.keys], options, f"{metric.name}:{metric.identity}")  # type: ignore[misc]

    def _cached_schedule(self, key: str | None, num_images: int, num_frames: int) -> Schedule | None:
        """The cached alphas under `key`, if present and of this morph's shape."""
        entry = self.cache.load(key) if key and self.cache is not None else None
        alphas = entry.get("alphas") if entry else None
        if alphas is None or tuple(alphas.shape) != (num_images - 1, num_frames):
            return None
        return [[float(a) for a in row] for row in alphas.tolist()]


def generated_endpoints(
    cache: TensorCache | None,
    image: Image.Image,
    prompts: Sequence[str],
    models: MorphModels,
    config: MorphConfig,
    resolution: int,
    generate: Callable[[list[int]], dict[int, Image.Image]],
    stop: StopCheck = never_stop,
) -> tuple[list[Image.Image], list[str]]:
    """The endpoints made from `image` for prompts 1..K-1 (endpoints.py) and, per endpoint,
    "hit", "miss" or "off": read where cached, else made by `generate` (all missing ones in one
    call, given their prompt indices) and cached as pixels, as `remember_images` keeps an input
    image; under their keys' locks, so two workers make an endpoint once (`stop` ends a wait for
    another worker's lock: MorphStopped)."""
    indices = list(range(1, len(prompts)))
    if cache is None:
        made = generate(indices)
        return [made[index] for index in indices], ["off"] * len(indices)
    model_identity = models.identity
    key_of = {index: endpoint_cache_key(image, prompts[0], prompts[index], model_identity, config, resolution)
              for index in indices}
    index_of = {key: index for index, key in key_of.items()}

    def make_missing(missing: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        made = generate(sorted({index_of[key] for key in missing}))
        return {key: {"pixels": torch.from_numpy(np.asarray(made[index_of[key]], dtype=np.uint8).copy())}
                for key in missing}

    entries, hits = cache.get_or_compute_many([key_of[index] for index in indices], make_missing, stop)
    images = [Image.fromarray(entries[key_of[index]]["pixels"].numpy(), mode="RGB") for index in indices]
    return images, ["hit" if key_of[index] in hits else "miss" for index in indices]


def stored_image(cache: TensorCache | None, key: str) -> Image.Image:
    """The image a previous result named by its `image_key` (CacheKeys.report). Raises
    ConfigError for a malformed key or a server without a cache, CacheMiss when the entry is
    gone (evicted, or the morph ran on a server with another cache)."""
    if cache is None:
        raise ConfigError("this server keeps no cache, so it cannot resolve image references; send the image")
    if not CACHE_KEY.match(key) or len(key) != 64:
        raise ConfigError(f"an image reference is a 64-digit hex image_key from a previous result, got {show(key)}")
    entry = cache.load(key)
    pixels = entry.get("pixels") if entry else None
    if pixels is None or pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3:
        raise CacheMiss(
            f"image {key[:16]}... is not in this server's cache (evicted, or stored by another "
            f"server); send the image itself"
        )
    return Image.fromarray(pixels.numpy(), mode="RGB")
