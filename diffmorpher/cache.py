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

Waiting for a lock is part of a request: the waiter asks the request's StopCheck every
`LOCK_POLL_S` (interrupt.py), so a deadline or a cancellation ends the wait with the same
MorphStopped a denoising step raises, and the server's StopCheck writes the worker's heartbeat,
so a worker waiting behind another's long fit is not taken for a wedged one. `lock_timeout_s`
(an hour) is only the last resort against a holder that never finishes: CacheWaitTimeout.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from morph_protocol import limits

from .config import FieldNamed
from .interrupt import MorphStopped, StopCheck, StopReason, never_stop

logger = logging.getLogger(__name__)

KEY = re.compile(r"^[0-9a-f]{16,128}$")
_MAGIC = b"DMC1"
_DIGEST = 32
LOCK_POLL_S = 0.1  # how often a waiter tries the lock again and asks its StopCheck


class CacheMiss(FieldNamed, LookupError):
    """An entry a request named (an image reference) is not in the cache. Servers map this to
    HTTP 404 / gRPC NOT_FOUND with `str(error)` as the message; `field`: the request field that
    named it, where the server knows it (config.FieldNamed)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(self._set_field(message, field, "field"))


class CacheWaitTimeout(TimeoutError):
    """A key's lock stayed held past the store's last-resort wait (an hour by default): its
    holder neither finished nor died. Servers answer it as busy (retry later), not as a failure
    of this request's inputs."""


class CacheStore(Protocol):
    """Bytes by content key, shared by every worker that can reach the store. `lock` waits for
    another holder of the key, asking `stop` while it waits (wait_for_lock)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def lock(self, key: str, stop: StopCheck = never_stop) -> ContextManager[None]: ...


def wait_for_lock(acquire: Callable[[], bool], key: str, stop: StopCheck, timeout_s: float) -> None:
    """Call `acquire` every LOCK_POLL_S until it returns True. Between tries ask `stop`: when the
    request's deadline passed or it was cancelled, raise MorphStopped (whose message says what
    the request was waiting for); after `timeout_s`, CacheWaitTimeout."""
    started = time.monotonic()
    while not acquire():
        waited = time.monotonic() - started
        reason = stop()
        if reason is not None:
            raise MorphStopped(StopReason(reason.kind, (
                f"{reason.message} (it was waiting {waited:.1f} s for another worker's fit of the same "
                f"image, cache key {key[:16]}, which goes on: a retry finds it cached)"
            )))
        if waited > timeout_s:
            raise CacheWaitTimeout(
                f"gave up after waiting {waited:.0f} s for another worker's fit of the same image "
                f"(cache key {key[:16]}), which has not finished; retry later"
            )
        time.sleep(LOCK_POLL_S)


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
    """Entries under `root` (one directory for all workers of a host), at most `max_bytes`.

    Size accounting without a directory walk per put: `root/size` holds the entries' total
    bytes, updated under its own `fcntl` lock by every put and removal. Eviction reads it; only
    when it exceeds the cap does a worker evict, taking the least recently used entries from
    the list its last full scan (stat of every entry) sorted by age, rescanning when that list
    is used up. An entry used or removed since the scan (its mtime changed, or it is gone) is
    skipped, so the order stays LRU and a scan serves as many evictions as it saw entries: the
    stats stay O(puts). Each store object scans once at its first put, which also corrects any
    drift of the total (a worker killed between writing an entry and counting it) and clears
    temporary files of dead writers.

    Lock files (`root/locks/<key>.lock`) are deleted by their holder on release, while still
    held; a waiter that then gets the lock of the deleted file sees that the path no longer
    names the file it locked (device and inode differ) and locks the path's new file instead.
    """

    root: Path
    max_bytes: int = limits.CACHE_MAX_BYTES
    lock_timeout_s: float = 3600.0
    _candidates: list[tuple[float, int, Path]] = field(default_factory=list, init=False, repr=False)  # newest first
    _scanned: bool = field(default=False, init=False, repr=False)

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
            self._add_to_total(-len(entry))
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: last to be evicted
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        entry = seal(data)
        try:
            replaced = path.stat().st_size  # an entry written again (e.g. by a worker that missed it)
        except FileNotFoundError:
            replaced = 0
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(entry)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        total = self._add_to_total(len(entry) - replaced) if self._scanned else None
        if total is None:  # this object's first put, or no readable total: count once
            total = self._scan()
        if total > self.max_bytes:
            self._evict_to_cap(total, keep=path)

    @contextlib.contextmanager
    def lock(self, key: str, stop: StopCheck = never_stop) -> Iterator[None]:
        """Exclusive across processes; released by the kernel if the holder dies. While another
        process holds it, `stop` is asked every LOCK_POLL_S (wait_for_lock)."""
        path = self.root / "locks" / f"{_check_key(key)}.lock"
        held: list[BinaryIO] = []

        def acquire() -> bool:
            while True:
                if not held:
                    held.append(open(path, "a+b"))
                try:
                    fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                if _names(path, held[0]):
                    return True
                held.pop().close()  # its holder deleted it after use: lock the path's new file

        try:
            wait_for_lock(acquire, key, stop, self.lock_timeout_s)
        except BaseException:
            for handle in held:
                handle.close()  # not ours: waited on, never locked
            raise
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if _names(path, held[0]):  # ours and held: no other process can lock or delete it now
                    path.unlink()
            held[0].close()  # releases the lock

    def evict(self, keep: Path | None = None) -> int:
        """Scan every entry, then delete least recently used ones until the total is under the
        cap; also clear temporary files left by writers that died (older than an hour).
        Returns bytes freed. Puts call the cheaper path (the running total) themselves."""
        return self._evict_to_cap(self._scan(), keep, rescan=False)

    def _evict_to_cap(self, total: int, keep: Path | None, rescan: bool = True) -> int:
        """Delete the oldest entries of the last scan until `total` is under the cap (one
        rescan when the list runs out first). Returns bytes freed."""
        freed = 0
        while total - freed > self.max_bytes:
            if not self._candidates:
                if not rescan:
                    break
                rescan = False
                total, freed = self._scan(), 0  # the true total, after what was freed so far
                continue
            mtime, _, path = self._candidates.pop()
            if path == keep:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another worker evicted it
            if stat.st_mtime != mtime:
                continue  # used since the scan: no longer among the least recent
            path.unlink(missing_ok=True)
            freed += stat.st_size
        if freed:
            self._add_to_total(-freed)
        return freed

    def _scan(self) -> int:
        """Stat every entry: the total (written to the size file) and the entries oldest first
        (this object's eviction candidates). Clears temporary files older than an hour."""
        entries, total = [], 0
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
        self._candidates = sorted(entries, reverse=True)  # the oldest last: pop() takes it
        self._scanned = True
        self._update_total(lambda _: total)
        return total

    def _add_to_total(self, delta: int) -> int | None:
        """Add `delta` bytes to the shared total; the new total, or None when there is no
        readable total yet (a scan then sets it)."""
        return self._update_total(lambda total: None if total is None else max(0, total + delta))

    def _update_total(self, change: Callable[[int | None], int | None]) -> int | None:
        """Read, change and write `root/size` under its lock (short: a few bytes)."""
        fd = os.open(self.root / "size", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current: int | None = int(os.pread(fd, 32, 0))
            except ValueError:
                current = None
            new = change(current)
            if new is not None:
                text = str(new).encode()
                os.pwrite(fd, text, 0)
                os.ftruncate(fd, len(text))
            return new
        finally:
            os.close(fd)  # releases the lock

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "entries").glob("*.bin"))


def _names(path: Path, handle: BinaryIO) -> bool:
    """Whether `path` still names the file `handle` has open (not deleted, not replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


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
    def locked(self, keys: list[str], stop: StopCheck = never_stop) -> Iterator[None]:
        """Hold the locks of several keys (taken in sorted order, so two workers needing
        overlapping sets cannot deadlock), asking `stop` while waiting for any of them."""
        with contextlib.ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.store.lock(key, stop))
            yield

    def get_or_compute_many(
        self,
        keys: list[str],
        compute: Callable[[list[str]], dict[str, dict[str, torch.Tensor]]],
        stop: StopCheck = never_stop,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
        """({key: tensors}, the keys that were hits). What the cache lacks is computed under the
        missing keys' locks, checked again first (another worker may have computed it while we
        waited), and `compute` gets every key still missing at once (e.g. one batched fit).
        `stop` ends a wait for another worker's lock (MorphStopped)."""
        found = {key: value for key in dict.fromkeys(keys) if (value := self.load(key)) is not None}
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            with self.locked(missing, stop):
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
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]], stop: StopCheck = never_stop
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """(tensors, hit) of one key: concurrent workers with the same key compute it once; the
        others wait (asking `stop`) and read the result."""
        values, hits = self.get_or_compute_many([key], lambda keys: {key: compute()}, stop)
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
