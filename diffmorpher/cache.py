"""A content-addressed cache of fitted LoRAs and inverted latents, shared by a server's workers.

Fitting a LoRA and inverting an image are most of a cold morph's time, and both depend only on
the image, its prompt, the model and a few hyper-parameters (lora.lora_cache_key). A repeated
image (the same photo morphed to several targets, a retried request, a web page's preview and
final render) then costs neither.

Two layers:
- `CacheStore`: bytes by key, plus a per-key lock, behind a small interface. `DiskStore` is a
  directory shared by the workers of one host: atomic writes (temporary file + rename, so a
  worker killed mid-write leaves no entry), a SHA-256 over every entry checked on read (a
  corrupt entry is deleted and recomputed, never served), LRU eviction to a size cap, and
  `fcntl` locks so two workers never compute the same key at once (the second waits, then
  reads). A Redis store for several hosts implements the same three methods.
- `TensorCache`: safetensors dicts in a store, and `get_or_compute(_many)` (check, lock, check
  again, compute what is still missing, write).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from morph_protocol import limits

from .config import FieldNamed

logger = logging.getLogger(__name__)

KEY = re.compile(r"^[0-9a-f]{16,128}$")
_MAGIC = b"DMC1"
_DIGEST = 32


class CacheMiss(FieldNamed, LookupError):
    """An entry a request named (an image reference) is not in the cache. Servers map this to
    HTTP 404 / gRPC NOT_FOUND with `str(error)` as the message; `field`: the request field that
    named it, where the server knows it (config.FieldNamed)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(self._set_field(message, field, "field"))


class CacheStore(Protocol):
    """Bytes by content key, shared by every worker that can reach the store."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def lock(self, key: str) -> ContextManager[None]: ...


def _check_key(key: str) -> str:
    if not KEY.match(key):  # keys are hex digests: never a path from outside
        raise ValueError(f"cache key must be a hex digest, got {key[:40]!r}")
    return key


def seal(data: bytes) -> bytes:
    """An entry: magic, SHA-256 of the payload, payload."""
    return _MAGIC + hashlib.sha256(data).digest() + data


def unseal(entry: bytes) -> bytes | None:
    """The payload, or None when the entry is damaged (truncated, flipped bits, foreign file)."""
    if len(entry) < len(_MAGIC) + _DIGEST or not entry.startswith(_MAGIC):
        return None
    digest, data = entry[len(_MAGIC) : len(_MAGIC) + _DIGEST], entry[len(_MAGIC) + _DIGEST :]
    return data if hashlib.sha256(data).digest() == digest else None


@dataclass
class DiskStore:
    """Entries under `root` (one directory for all workers of a host), at most `max_bytes`."""

    root: Path
    max_bytes: int = limits.CACHE_MAX_BYTES
    lock_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / "entries" / f"{_check_key(key)}.bin"

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            entry = path.read_bytes()
        except FileNotFoundError:
            return None
        data = unseal(entry)
        if data is None:
            logger.warning("cache entry %s is damaged; removed, it will be recomputed", key)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: last to be evicted
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(seal(data))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.evict(keep=path)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive across processes; released by the kernel if the holder dies."""
        with open(self.root / "locks" / f"{_check_key(key)}.lock", "a+b") as handle:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cache key {key} stayed locked for {self.lock_timeout_s:.0f} s")
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the total is under the cap; also clear
        temporary files left by writers that died (older than an hour). Returns bytes freed."""
        entries, total, freed = [], 0, 0
        now = time.time()
        for path in (self.root / "entries").iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.suffix == ".tmp":
                if now - stat.st_mtime > 3600:
                    path.unlink(missing_ok=True)
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
            total += stat.st_size
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            freed += size
        return freed

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "entries").glob("*.bin"))


class TensorCache:
    """Dicts of tensors in a CacheStore (safetensors on the CPU)."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        data = self.store.get(key)
        if data is None:
            return None
        try:
            return load_tensors(data)
        except Exception:  # noqa: BLE001 - a sealed but unreadable entry: recompute it
            logger.warning("cache entry %s holds no tensors; recomputing", key)
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self.store.put(key, save_tensors(cpu))

    @contextlib.contextmanager
    def locked(self, keys: list[str]) -> Iterator[None]:
        """Hold the locks of several keys (taken in sorted order, so two workers needing
        overlapping sets cannot deadlock)."""
        with contextlib.ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.store.lock(key))
            yield

    def get_or_compute_many(
        self, keys: list[str], compute: Callable[[list[str]], dict[str, dict[str, torch.Tensor]]]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
        """({key: tensors}, the keys that were hits). What the cache lacks is computed under the
        missing keys' locks, checked again first (another worker may have computed it while we
        waited), and `compute` gets every key still missing at once (e.g. one batched fit)."""
        found = {key: value for key in dict.fromkeys(keys) if (value := self.load(key)) is not None}
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            with self.locked(missing):
                found |= {key: value for key in missing if (value := self.load(key)) is not None}
                still = [key for key in missing if key not in found]
                hits = set(found)
                if still:
                    computed = compute(still)
                    for key in still:
                        self.save(key, computed[key])
                        found[key] = computed[key]
                return found, hits
        return found, set(found)

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """(tensors, hit) of one key: concurrent workers with the same key compute it once; the
        others wait and read the result."""
        values, hits = self.get_or_compute_many([key], lambda keys: {key: compute()})
        return values[key], key in hits


@dataclass
class CacheKeys:
    """One input image's keys in a morph, and whether each was found."""

    lora: str | None  # None: not cached (no LoRA, or the caller gave the LoRA)
    latent: str | None  # None: not cached (the inversion depends on another image's LoRA)
    image: str | None = None  # the preprocessed image, which a client may send back as a reference
    lora_hit: bool = False
    latent_hit: bool = False

    def report(self) -> dict[str, str | None]:
        """For the result metadata: per image, "hit", "miss" or "off", the LoRA's key, and the
        image's key (what a later request may send instead of the image)."""

        def state(key: str | None, hit: bool) -> str:
            return "off" if key is None else "hit" if hit else "miss"

        return {"lora": state(self.lora, self.lora_hit), "latent": state(self.latent, self.latent_hit),
                "lora_key": self.lora, "image_key": self.image}
