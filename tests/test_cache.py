"""The LoRA/latent cache: disk store integrity, eviction and locking across processes, and the
pipeline skipping fitting and inversion for images it has seen."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmorpher.cache import DiskStore, TensorCache
from diffmorpher.config import MorphConfig
from diffmorpher.pipeline import DiffMorpherPipeline
from diffmorpher.results import WorkDone

KEY = "ab" * 32


def test_entries_round_trip_and_damaged_ones_are_dropped(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, b"payload")
    assert store.get(KEY) == b"payload"
    entry = store.path(KEY)
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert store.get(KEY) is None and not entry.exists()  # never served, removed for a refit
    store.put(KEY, b"payload")
    entry.write_bytes(entry.read_bytes()[:10])  # truncated
    assert store.get(KEY) is None
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")


def test_writes_are_atomic_and_leftovers_are_cleared(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    leftover = store.root / "entries" / f".{KEY[:16]}.x.tmp"  # a writer killed mid-write
    leftover.write_bytes(b"half")
    assert store.get(KEY) is None
    old = time.time() - 7200
    import os

    os.utime(leftover, (old, old))
    store.put(KEY, b"whole")
    assert not leftover.exists() and store.get(KEY) == b"whole"
    assert [p.name for p in (store.root / "entries").iterdir()] == [f"{KEY}.bin"]


def test_least_recently_used_entries_go_first(tmp_path: Path) -> None:
    import os

    store = DiskStore(tmp_path, max_bytes=4 * 1100)
    keys = [f"{i:02x}" * 32 for i in range(4)]
    for age, key in enumerate(keys):
        store.put(key, bytes(1000))
        os.utime(store.path(key), (1000 + age, 1000 + age))
    store.get(keys[0])  # used: now the newest
    store.put("ee" * 32, bytes(1000))
    present = {key for key in keys if store.path(key).exists()}
    assert present == {keys[0], keys[2], keys[3]} and store.size_bytes <= 4 * 1100


def _compute_in_process(root: str, results: "multiprocessing.Queue") -> None:
    cache = TensorCache(DiskStore(Path(root)))

    def slow() -> dict[str, torch.Tensor]:
        results.put("computed")
        time.sleep(1.0)
        return {"x": torch.ones(3)}

    value, hit = cache.get_or_compute(KEY, slow)
    results.put(("hit" if hit else "miss", float(value["x"].sum())))


def test_two_workers_never_compute_the_same_key_at_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_compute_in_process, args=(str(tmp_path), results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    answers = [results.get(timeout=5) for _ in range(3)]
    assert answers.count("computed") == 1
    assert sorted(a for a in answers if a != "computed") == [("hit", 3.0), ("miss", 3.0)]


FAST = dict(num_frames=3, lora_steps=2, lora_rank=4, num_inference_steps=3, perceptual_metric="pixel",
            use_reschedule=False)


def _inputs() -> tuple[list[Image.Image], list[str]]:
    return [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))], ["a red", "a blue"]


def test_a_repeated_image_costs_no_fitting_and_no_inversion(tiny_sd_dir: Path, tmp_path: Path) -> None:
    cold = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(DiskStore(tmp_path)))
    images, prompts = _inputs()
    first = cold(images, prompts, MorphConfig(**FAST))
    assert [c["lora"] for c in first.cache] == ["miss", "miss"] and [c["latent"] for c in first.cache] == ["miss"] * 2
    steps = FAST["lora_steps"]
    assert first.work == WorkDone(lora_fits=2, lora_steps=2 * steps, inversions=2)
    # Another worker (its own pipeline) on the same store; one image is new.
    warm = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(DiskStore(tmp_path)))
    progress = []
    second = warm(images, prompts, MorphConfig(**FAST), progress=progress.append)
    assert [c["lora"] for c in second.cache] == ["hit", "hit"] and [c["latent"] for c in second.cache] == ["hit"] * 2
    assert not [e for e in progress if e.stage in ("lora", "inversion")]  # nothing was fitted or inverted
    assert second.work == WorkDone(lora_fits=0, lora_steps=0, inversions=0)
    assert (second.frame_tensors - first.frame_tensors).abs().max() < 1e-5
    third = warm([images[0], Image.new("RGB", (16, 16), (0, 200, 0))], [prompts[0], "a green"], MorphConfig(**FAST))
    assert [c["lora"] for c in third.cache] == ["hit", "miss"]
    assert third.work == WorkDone(lora_fits=1, lora_steps=steps, inversions=1)  # only the new image
    changed = warm(images, prompts, MorphConfig(**{**FAST, "lora_steps": 3}))
    assert [c["lora"] for c in changed.cache] == ["miss", "miss"]  # a hyper-parameter is in the key


def test_a_repeated_morph_skips_the_reschedules_measuring_pass(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """The rescheduled alphas are cached under the images' latent keys and every option: the
    same morph again makes no measuring pass and gives the same frames; another option (here
    num_frames) measures again; a caller-given LoRA has no latent key, so nothing is cached."""
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(DiskStore(tmp_path)))
    images, prompts = _inputs()
    config = MorphConfig(**{**FAST, "use_reschedule": True, "num_frames": 5})
    first = pipe(images, prompts, config)
    progress: list = []
    second = pipe(images, prompts, config, progress=progress.append)
    assert (first.schedule_cache, second.schedule_cache) == ("miss", "hit")
    assert not [e for e in progress if e.stage == "reschedule"]  # no measuring pass
    assert second.alphas == first.alphas and (second.frame_tensors - first.frame_tensors).abs().max() == 0
    assert pipe(images, prompts, config.replace(num_frames=4)).schedule_cache == "miss"
    assert pipe(images, prompts, config, loras=first.loras).schedule_cache == "off"
    assert pipe(images, prompts, config.replace(use_reschedule=False)).schedule_cache == "off"


def test_an_image_key_stands_in_for_the_image(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """A result names each image by its image_key; the image the server kept under it morphs to
    the same frames as the original, with every LoRA and latent a hit."""
    from diffmorpher.cache import CacheMiss
    from diffmorpher.config import ConfigError

    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(DiskStore(tmp_path)))
    images, prompts = _inputs()
    first = pipe(images, prompts, MorphConfig(**FAST))
    keys = [c["image_key"] for c in first.cache]
    stored = [pipe.stored_image(key) for key in keys]
    assert all(image.size == (first.resolution, first.resolution) for image in stored)
    again = pipe(stored, prompts, MorphConfig(**FAST))
    assert [c["image_key"] for c in again.cache] == keys
    assert {c["lora"] for c in again.cache} == {"hit"} and {c["latent"] for c in again.cache} == {"hit"}
    assert (again.frame_tensors - first.frame_tensors).abs().max() == 0
    with pytest.raises(CacheMiss, match="send the image itself"):
        pipe.stored_image("0" * 64)
    with pytest.raises(ConfigError, match="64-digit hex"):
        pipe.stored_image("../" + "0" * 61)
    with pytest.raises(ConfigError, match="keeps no cache"):
        DiffMorpherPipeline(pipe.models).stored_image(keys[0])


def test_fixed_lora_mode_does_not_cache_latents_that_depend_on_a_neighbour(tiny_sd_dir: Path, tmp_path: Path) -> None:
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(DiskStore(tmp_path)))
    images, prompts = _inputs()
    result = pipe(images, prompts, MorphConfig(**FAST, fixed_lora_alpha=0.5))
    assert [c["latent"] for c in result.cache] == ["off", "off"] and [c["lora"] for c in result.cache] == ["miss"] * 2


def test_the_model_identity_follows_content_not_location(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """TorchServe unpacks an archive into a new temporary folder at every start: the same
    weights there must keep their cache keys; changed weights must not."""
    import shutil

    from diffmorpher.models import load_morph_models

    copy = tmp_path / "unpacked-again"
    shutil.copytree(tiny_sd_dir, copy)
    original = load_morph_models(tiny_sd_dir, torch.device("cpu")).identity
    assert load_morph_models(copy, torch.device("cpu")).identity == original
    weights = next(copy.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert load_morph_models(copy, torch.device("cpu")).identity != original
