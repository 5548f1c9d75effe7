"""Two TorchServe replicas (each with its own ports, guard and disk cache) and one Redis on
loopback: a morph on replica A fits the LoRAs; the same images on replica B are cache hits
through the shared tier, with identical frames. Then Redis dies: both replicas keep serving
(new images are fitted locally) and their results say the shared tier is down."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.auth import TokenSource
from client.morph_client import MorphClient, MorphResult
from reliability.corpus import PROMPTS, circle, encode, square
from tests.redis_server import RedisProcess
from tests.torchserve_server import TorchServeProcess

pytestmark = pytest.mark.slow

OPTIONS = {"num_frames": 3, "lora_steps": 40, "num_inference_steps": 4, "use_reschedule": True, "seed": 3}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    root = tmp_path_factory.mktemp("replicas")
    with RedisProcess(root / "redis") as redis:
        env = {"DIFFMORPHER_CACHE_REDIS_URL": redis.url}
        with TorchServeProcess(root / "a", model_store, env=env) as a, \
                TorchServeProcess(root / "b", model_store, env=env) as b:
            assert a.cache_dir != b.cache_dir and a.grpc_target != b.grpc_target
            yield a, b, redis


def morph(server: TorchServeProcess, images: list[bytes]) -> MorphResult:
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
        return client.morph(images, list(PROMPTS[:2]), OPTIONS, deadline_s=600)


def test_replica_b_reuses_what_replica_a_fitted(replicas) -> None:
    a, b, _ = replicas
    images = [encode(circle()), encode(square())]
    on_a = morph(a, images)
    on_b = morph(b, images)
    assert [c["lora"] for c in on_a.metadata["cache"]] == ["miss", "miss"]
    assert [c["lora"] for c in on_b.metadata["cache"]] == ["hit", "hit"]
    assert [c["latent"] for c in on_b.metadata["cache"]] == ["hit", "hit"]
    assert on_b.metadata["schedule_cache"] == "hit"
    assert on_a.metadata["cache_remote"] == on_b.metadata["cache_remote"] == "ok"
    assert [p.data for p in on_b.parts] == [p.data for p in on_a.parts]  # identical frames
    assert on_b.metadata["timings"]["lora"] < 0.25 * on_a.metadata["timings"]["lora"]
    print(f"\nreplica A fitted in {on_a.metadata['timings']['lora']:.2f} s; replica B "
          f"{on_b.metadata['timings']['lora']:.3f} s (shared tier)")


def test_replicas_keep_serving_when_redis_dies(replicas) -> None:
    a, b, redis = replicas
    redis.stop()
    images = [encode(circle(colour=(0, 160, 0))), encode(square())]
    on_b = morph(b, images)  # a new image: fitted locally, the shared tier skipped
    assert on_b.metadata["cache"][0]["lora"] == "miss" and on_b.metadata["cache_remote"] == "down"
    again = morph(b, images)  # the local tier still serves hits
    assert [c["lora"] for c in again.metadata["cache"]] == ["hit", "hit"]
    assert morph(a, images).metadata["num_frames"] == 3  # A serves too (its own fit)
