"""A server run with token authorization disabled (e.g. behind KServe's ingress, which
authenticates): TorchServe then writes no key file, and the guard must manage it without one.
It used to read the management key from that file forever and never report healthy."""

from __future__ import annotations

from pathlib import Path

import pytest

from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient
from reliability.corpus import PROMPTS, circle, encode, square
from launcher.torchserve import TorchServeProcess

pytestmark = pytest.mark.slow


def test_the_guard_serves_a_server_without_token_authorization(tmp_path: Path, model_store: Path) -> None:
    overrides = {"disable_token_authorization": "true"}
    with TorchServeProcess(tmp_path / "server", model_store, overrides=overrides) as server:  # waits for /healthz 200
        assert not server.key_file.exists()
        status, health = server.health()
        assert status == 200, health
        with MorphClient(server.grpc_target, tokens=TokenSource(enabled=False), retries=0) as client:
            result = client.morph([encode(circle()), encode(square())], list(PROMPTS[:2]),
                                  {"num_frames": 3, "lora_steps": 2, "num_inference_steps": 2}, deadline_s=300)
        assert result.metadata["num_frames"] == 3
