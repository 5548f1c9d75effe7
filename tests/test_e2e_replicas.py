"""Two TorchServe replicas (each with its own ports, guard and disk cache) and one Redis on
loopback: a morph on replica A fits the LoRAs; the same images on replica B are cache hits
through the shared tier, with identical frames and no LoRA fit or inversion run on B (counted
in the result's `work`, not read off the hit/miss labels). Then Redis dies: both replicas keep serving
(new images are fitted locally) and their results say the shared tier is down.

Both guards check clients against one "Secret" (a directory laid out as the kubelet mounts one,
`--client-tokens`), as in deploy/base: one client token works on both replicas although each
TorchServe drew its own keys; a rotated Secret is picked up by both, an emptied one takes both
out of readiness."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import grpc

from grpc_api import stubs
from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient, MorphResult
from guard.client_auth import (
    MISSING_TOKEN, UPSTREAM_KEY_REFUSED, WRONG_TOKEN, ClientTokenAdmission, ClientTokens,
)
from guard.gateway import Gateway, GatewayConfig
from reliability.corpus import PROMPTS, circle, encode, square
from tests.redis_server import RedisProcess
from tests.test_client_auth import TOKEN_A, TOKEN_B, mount_secret
from tests.test_e2e_torchserve import metric_values
from launcher.torchserve import TorchServeProcess, free_ports

pytestmark = pytest.mark.slow

OPTIONS = {"num_frames": 3, "lora_steps": 40, "num_inference_steps": 4, "use_reschedule": True, "seed": 3}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    root = tmp_path_factory.mktemp("replicas")
    secret = root / "client-tokens"
    mount_secret(secret, {"client-a": TOKEN_A}, 1)
    guard_args = ("--interval", "1", "--client-tokens", str(secret))
    with RedisProcess(root / "redis") as redis:
        env = {"DIFFMORPHER_CACHE_REDIS_URL": redis.url}
        with TorchServeProcess(root / "a", model_store, env=env, guard_args=guard_args) as a, \
                TorchServeProcess(root / "b", model_store, env=env, guard_args=guard_args) as b:
            assert a.cache_dir != b.cache_dir and a.grpc_target != b.grpc_target
            assert a.key() != b.key()  # each TorchServe drew its own keys
            yield a, b, redis, secret


def morph(server: TorchServeProcess, images: list[bytes], token: str = TOKEN_A) -> MorphResult:
    with MorphClient(server.grpc_target, tokens=TokenSource(token=token), retries=0) as client:
        return client.morph(images, list(PROMPTS[:2]), OPTIONS, deadline_s=600)


def admitted(server: TorchServeProcess | str, token: str | None) -> tuple[grpc.StatusCode, str]:
    """Status of a request the handler refuses at once (no images): INVALID_ARGUMENT means the
    gateway let it through to TorchServe, UNAUTHENTICATED that it did not."""
    pb2, pb2_grpc = stubs.load()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    target = server if isinstance(server, str) else server.grpc_target
    with grpc.insecure_channel(target) as channel:
        try:
            pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                pb2.PredictionsRequest(model_name="diffmorpher", input={}), timeout=60, metadata=metadata)
        except grpc.RpcError as error:
            return error.code(), error.details()
    raise AssertionError("a request without images was served")


def wait_for(predicate, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "not within the timeout"
        time.sleep(0.2)
    return time.monotonic() - start


def test_replica_b_reuses_what_replica_a_fitted(replicas) -> None:
    a, b, _, _ = replicas
    images = [encode(circle()), encode(square())]
    on_a = morph(a, images)
    on_b = morph(b, images)
    # Counted work, not labels: B fits and inverts nothing (a recompute would give the same frames).
    steps = OPTIONS["lora_steps"]
    assert on_a.metadata["work"] == {"lora_fits": 2, "lora_steps": 2 * steps, "inversions": 2}, on_a.metadata["work"]
    assert on_b.metadata["work"] == {"lora_fits": 0, "lora_steps": 0, "inversions": 0}, on_b.metadata["work"]
    assert [c["lora"] for c in on_b.metadata["cache"]] == ["hit", "hit"]
    assert on_b.metadata["schedule_cache"] == "hit"
    assert on_a.metadata["cache_remote"] == on_b.metadata["cache_remote"] == "ok"
    assert [p.data for p in on_b.parts] == [p.data for p in on_a.parts]  # identical frames
    assert on_b.metadata["timings"]["lora"] < 0.25 * on_a.metadata["timings"]["lora"]
    # The LoRAs, latents and schedule (at least) came from the shared tier: B's metrics say so, A's do not.
    assert sum(metric_values(b, "CacheRemoteHits").values()) >= 5
    assert sum(metric_values(a, "CacheRemoteHits").values()) == 0
    print(f"\nreplica A fitted in {on_a.metadata['timings']['lora']:.2f} s; replica B "
          f"{on_b.metadata['timings']['lora']:.3f} s (shared tier)")


def test_one_client_token_works_on_both_replicas_and_nothing_else_does(replicas) -> None:
    a, b, _, _ = replicas
    for server in (a, b):
        assert admitted(server, TOKEN_A)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert admitted(server, None) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        assert admitted(server, TOKEN_B) == (grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN)
    # A TorchServe's own key is no client token, on its own replica or the other.
    assert admitted(a, a.key()) == admitted(b, a.key()) == (grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN)
    assert a.health()[1]["client_auth"]["valid_tokens"] == 1


def test_a_rotated_secret_is_picked_up_by_both_replicas(replicas) -> None:
    a, b, _, secret = replicas
    mount_secret(secret, {"client-a": TOKEN_A, "client-b": TOKEN_B}, 2)  # the new one beside the old
    for server in (a, b):
        wait_for(lambda: admitted(server, TOKEN_B)[0] == grpc.StatusCode.INVALID_ARGUMENT)
        assert admitted(server, TOKEN_A)[0] == grpc.StatusCode.INVALID_ARGUMENT
    mount_secret(secret, {"client-b": TOKEN_B}, 3)  # the old one revoked
    for server in (a, b):
        seconds = wait_for(lambda: admitted(server, TOKEN_A)[0] == grpc.StatusCode.UNAUTHENTICATED)
        assert seconds < 3.0
    assert morph(b, [encode(circle()), encode(square())], token=TOKEN_B).metadata["num_frames"] == 3

    mount_secret(secret, {}, 4)  # emptied by mistake: nobody is admitted, both leave readiness
    for server in (a, b):
        wait_for(lambda: server.health()[0] == 503)
        assert any("no usable client token" in reason for reason in server.health()[1]["reasons"])
        code, details = admitted(server, TOKEN_B)
        assert code == grpc.StatusCode.UNAVAILABLE and "admits no client" in details
    mount_secret(secret, {"client-a": TOKEN_A}, 5)  # restored for the tests that follow
    for server in (a, b):
        wait_for(lambda: server.health()[0] == 200)


def test_the_gateway_renews_its_own_key_when_torchserve_refuses_it(replicas, tmp_path: Path) -> None:
    """A key cached just before a rotation: TorchServe refuses it, the gateway re-reads the key
    file and retries once; a key file that still holds a refused key answers UNAVAILABLE."""
    a, _, _, secret = replicas
    key_file = tmp_path / "key_file.json"
    real = a.key_file.read_text()
    stale = real.replace(a.key(), "x" * len(a.key()))
    key_file.write_text(stale)
    own_key = TokenSource(key_file=key_file, use_env=False)
    assert own_key.get() == "x" * len(a.key())  # cached with the file's (mtime, size)
    stamp = key_file.stat().st_mtime_ns
    key_file.write_text(real)  # the renewed key, same size and mtime: the cache cannot tell
    os.utime(key_file, ns=(stamp, stamp))
    port = free_ports(1)[0]
    admission = ClientTokenAdmission(ClientTokens(secret), own_key)
    server = Gateway(GatewayConfig(f"127.0.0.1:{port}", a.direct_grpc_target), None, admission).server()
    server.start()
    try:
        assert admitted(f"127.0.0.1:{port}", TOKEN_A)[0] == grpc.StatusCode.INVALID_ARGUMENT  # retried
        key_file.write_text(stale)
        assert admitted(f"127.0.0.1:{port}", TOKEN_A) == (grpc.StatusCode.UNAVAILABLE, UPSTREAM_KEY_REFUSED)
    finally:
        server.stop(grace=1).wait()


def test_replicas_keep_serving_when_redis_dies(replicas) -> None:
    a, b, redis, _ = replicas
    redis.stop()
    images = [encode(circle(colour=(0, 160, 0))), encode(square())]
    on_b = morph(b, images)  # a new image: fitted locally, the shared tier skipped
    assert on_b.metadata["work"]["lora_fits"] == 1 and on_b.metadata["cache_remote"] == "down"  # the new image only
    again = morph(b, images)  # the local tier still serves hits
    assert again.metadata["work"] == {"lora_fits": 0, "lora_steps": 0, "inversions": 0}, again.metadata["work"]
    on_a = morph(a, images)  # A serves too: its own fit of the new image, as it cannot reach B's
    assert on_a.metadata["num_frames"] == 3 and on_a.metadata["work"]["lora_fits"] == 1, on_a.metadata["work"]
