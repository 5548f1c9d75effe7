"""A real key rotation on a real TorchServe (token authorization on, as shipped): the guard's
TokenRotator asks TorchServe for new keys, TorchServe rewrites key_file.json and refuses the old
keys from then on, and the guard's gateway, which calls TorchServe with its own key read from
that file (`--client-tokens`), follows: a client's requests keep succeeding across the rotation.

tests/test_guard.py checks *when* the rotator rotates (at half a key's lifetime) on a fake; only
a real TorchServe shows that a rotation changes the key file and what TorchServe accepts."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import grpc

from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient
from guard.tokens import TokenRotator
from reliability.corpus import PROMPTS, circle, encode, square
from tests.test_client_auth import TOKEN_A, mount_secret
from tests.test_e2e_replicas import admitted
from launcher.torchserve import TorchServeProcess

pytestmark = pytest.mark.slow

QUICK = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    root = tmp_path_factory.mktemp("tokens")
    secret = root / "client-tokens"
    mount_secret(secret, {"client-a": TOKEN_A}, 1)
    guard_args = ("--interval", "1", "--client-tokens", str(secret))
    with TorchServeProcess(root / "server", model_store, guard_args=guard_args) as server:
        yield server


def management_status(server: TorchServeProcess, key: str) -> int:
    """HTTP status of listing the models on TorchServe's management API with `key`."""
    request = urllib.request.Request(server.url("management", "/models"), headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def morph_frames(server: TorchServeProcess) -> int:
    with MorphClient(server.grpc_target, tokens=TokenSource(token=TOKEN_A), retries=0) as client:
        return client.morph([encode(circle()), encode(square())], list(PROMPTS[:2]), QUICK, deadline_s=300).metadata["num_frames"]


def test_the_gateway_follows_a_real_key_rotation_and_torchserve_refuses_the_old_keys(server: TorchServeProcess) -> None:
    old = {kind: server.key(kind) for kind in ("inference", "management")}
    assert admitted(server.direct_grpc_target, old["inference"])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert morph_frames(server) == 2  # through the gateway, on the old key

    renewed = TokenRotator(server.management_api(), lifetime_s=3600).rotate_due(time.time() + 3600)
    assert sorted(renewed) == ["inference", "management"]
    new = {kind: server.key(kind) for kind in ("inference", "management")}
    assert new["inference"] != old["inference"] and new["management"] != old["management"]  # the file was rewritten

    # TorchServe itself: the old keys are refused, the new ones accepted.
    code, details = admitted(server.direct_grpc_target, old["inference"])
    assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert admitted(server.direct_grpc_target, new["inference"])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert management_status(server, old["management"]) in (400, 401, 403)
    assert management_status(server, new["management"]) == 200

    # The gateway re-read its key: the client's requests, with the same client token, go on.
    assert admitted(server, TOKEN_A)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert morph_frames(server) == 2
    assert server.health()[0] == 200
