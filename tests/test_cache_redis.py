"""The cache's shared tier against a real redis-server on loopback: sealed entries (a damaged
one is dropped, never served), an entry size cap and the server's LRU cap, hits shared between
hosts (each with its own disk tier), one fit per key across replicas (leased locks that a dead
holder releases), and a Redis that is down or dies costing speed only, never a request."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmorpher.cache import DiskStore, TensorCache, seal
from diffmorpher.cache_redis import KEY_PREFIX, LOCK_PREFIX, RedisStore, TieredStore
from diffmorpher.config import MorphConfig
from diffmorpher.interrupt import DEADLINE, MorphStopped, StopReason
from diffmorpher.pipeline import DiffMorpherPipeline
from tests.redis_server import RedisProcess

KEY = "cd" * 32


@pytest.fixture()
def redis_server(tmp_path: Path):
    with RedisProcess(tmp_path / "redis", maxmemory="16mb") as server:
        yield server


def test_entries_are_sealed_capped_and_damaged_ones_dropped(redis_server: RedisProcess) -> None:
    store = RedisStore(redis_server.url, max_entry_bytes=1024)
    store.put(KEY, b"fitted lora")
    assert store.get(KEY) == b"fitted lora"
    assert store.client.get(KEY_PREFIX + KEY) == seal(b"fitted lora")
    damaged = bytearray(seal(b"fitted lora"))
    damaged[-1] ^= 1
    store.client.set(KEY_PREFIX + KEY, bytes(damaged))
    assert store.get(KEY) is None and store.client.get(KEY_PREFIX + KEY) is None  # dropped
    store.put("ef" * 32, b"x" * 2048)  # over the entry cap: not sent
    assert store.get("ef" * 32) is None
    with pytest.raises(ValueError, match="hex digest"):
        store.get("../../etc/passwd")


def test_the_servers_lru_cap_evicts_without_failing_writes(redis_server: RedisProcess) -> None:
    store = RedisStore(redis_server.url)
    for index in range(40):  # 40 MiB into a 16 MiB server
        store.put(f"{index:064x}", bytes([index]) * 2**20)
    assert store.get(f"{39:064x}") == bytes([39]) * 2**20
    assert store.get(f"{0:064x}") is None  # the oldest went first
    assert int(store.client.info("memory")["used_memory"]) < 20 * 2**20


def test_a_second_host_reads_what_the_first_wrote_and_keeps_a_local_copy(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    host_a = TieredStore(DiskStore(tmp_path / "a"), RedisStore(redis_server.url))
    host_b = TieredStore(DiskStore(tmp_path / "b"), RedisStore(redis_server.url))
    host_a.put(KEY, b"lora of image 1")
    assert host_b.local.get(KEY) is None
    assert host_b.get(KEY) == b"lora of image 1" and host_b.status.hits == 1
    assert host_b.local.get(KEY) == b"lora of image 1"  # promoted to B's disk
    assert (host_a.status.errors, host_b.status.errors) == (0, 0)


def _fit_on_a_replica(root: str, url: str, results: "multiprocessing.Queue") -> None:
    cache = TensorCache(TieredStore(DiskStore(Path(root)), RedisStore(url)))

    def fit() -> dict[str, torch.Tensor]:
        time.sleep(1.0)  # a slow fit: the other replica arrives while it runs
        return {"w": torch.ones(2)}

    _, hit = cache.get_or_compute(KEY, fit)
    results.put(hit)


def test_two_replicas_fit_a_key_once(redis_server: RedisProcess, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    replicas = [context.Process(target=_fit_on_a_replica, args=(str(tmp_path / name), redis_server.url, results))
                for name in ("a", "b")]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(60)
    assert sorted(results.get(timeout=5) for _ in replicas) == [False, True]  # one fit, one hit


def test_a_dead_holders_lock_lapses_after_its_lease(redis_server: RedisProcess) -> None:
    store = RedisStore(redis_server.url, lock_lease_s=1.0)
    store.client.set(LOCK_PREFIX + KEY, "a replica that died", px=1000)  # never released
    started = time.monotonic()
    with store.lock(KEY):
        waited = time.monotonic() - started
    assert 0.5 < waited < 5.0
    assert store.client.get(LOCK_PREFIX + KEY) is None  # released by its holder


def test_a_wait_for_another_replicas_lock_ends_at_the_requests_deadline(redis_server: RedisProcess, tmp_path: Path) -> None:
    remote = RedisStore(redis_server.url)
    remote.client.set(LOCK_PREFIX + KEY, "another replica, fitting", px=60_000)
    store = TieredStore(DiskStore(tmp_path), remote)
    deadline, asked = time.monotonic() + 1.0, []

    def stop() -> StopReason | None:
        asked.append(time.monotonic())
        return StopReason(DEADLINE, "deadline exceeded") if asked[-1] >= deadline else None

    started = time.monotonic()
    with pytest.raises(MorphStopped, match="another worker's fit of the same image"):
        with store.lock(KEY, stop):
            pass
    assert 1.0 <= time.monotonic() - started < 1.6 and len(asked) >= 8
    assert store.status.errors == 0  # the request stopped: not a failure of the shared tier
    assert list((tmp_path / "locks").iterdir()) == []  # the host's lock was released and deleted


def test_a_held_lock_is_renewed_past_its_lease(redis_server: RedisProcess) -> None:
    store = RedisStore(redis_server.url, lock_lease_s=0.6)
    with store.lock(KEY):
        time.sleep(1.5)  # longer than the lease: the renewer keeps it
        assert store.client.get(LOCK_PREFIX + KEY) is not None


def test_redis_down_costs_speed_not_requests(redis_server: RedisProcess, tmp_path: Path, tiny_sd_dir: Path) -> None:
    """The server dies mid-life: reads miss, writes and locks stay local, the failure is
    counted and the tier is not retried for a while; a morph still succeeds and caches
    locally."""
    store = TieredStore(DiskStore(tmp_path / "host"), RedisStore(redis_server.url, socket_timeout_s=1.0),
                        retry_after_s=60.0)
    store.put(KEY, b"before")
    redis_server.stop()
    assert store.get(KEY) == b"before"  # the local tier answers
    assert store.get("ab" * 32) is None and store.status.errors == 1 and store.status.state == "down"
    store.put("ab" * 32, b"after")
    with store.lock("ab" * 32):
        pass
    assert store.get("ab" * 32) == b"after" and store.status.errors == 1  # not retried while down
    pipe = DiffMorpherPipeline.from_pretrained(tiny_sd_dir, device="cpu", cache=TensorCache(store))
    images = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    options = dict(num_frames=3, lora_steps=2, lora_rank=4, num_inference_steps=3, use_reschedule=False)
    first = pipe(images, ["a red", "a blue"], MorphConfig(**options))
    second = pipe(images, ["a red", "a blue"], MorphConfig(**options))
    assert [c["lora"] for c in first.cache] == ["miss", "miss"] and [c["lora"] for c in second.cache] == ["hit", "hit"]


def test_an_unreachable_redis_at_start_is_not_fatal(tmp_path: Path) -> None:
    from launcher.torchserve import free_ports

    store = TieredStore(DiskStore(tmp_path / "host"),
                        RedisStore(f"redis://127.0.0.1:{free_ports(1)[0]}/0", socket_timeout_s=0.5))
    store.put(KEY, b"local only")
    assert store.get(KEY) == b"local only" and store.status.errors == 1 and "Connection" in store.status.last_error
