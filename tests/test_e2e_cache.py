"""Two workers of one TorchServe share the LoRA/latent cache: two concurrent morphs of the same
images land on different workers; one fits, the other waits on the key's lock and reuses the
result; a later morph on either worker is a full hit. A client may then send the images'
`image_key`s instead of the images: the same frames, no upload, no fitting; an unknown key is
NOT_FOUND and a malformed one INVALID_ARGUMENT, with messages that say what to send."""

from __future__ import annotations

from concurrent import futures

import pytest

import grpc

from morph_protocol import wire
from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient, MorphClientError
from reliability.corpus import PROMPTS, circle, encode, request, square
from launcher.archive import export_model
from tests.conftest import served_model
from launcher.torchserve import TorchServeProcess

pytestmark = pytest.mark.slow

OPTIONS = {"num_frames": 3, "lora_steps": 40, "num_inference_steps": 4, "use_reschedule": False, "seed": 5}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    root = tmp_path_factory.mktemp("cache-e2e")
    export_model(served_model(request), root / "store", "--workers", "2")
    with TorchServeProcess(root / "server", root / "store") as server:
        yield server


def morph(server: TorchServeProcess) -> dict:
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
        return client.predict(request(options=OPTIONS), deadline_s=600).header


def test_workers_share_fitted_loras_and_latents(two_workers: TorchServeProcess) -> None:
    assert len(two_workers.worker_pids()) == 2
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: morph(two_workers), range(2))
    assert first["worker_pid"] != second["worker_pid"], "both morphs ran on one worker"
    states = sorted([c["lora"] for c in first["cache"]] + [c["lora"] for c in second["cache"]])
    assert states == ["hit", "hit", "miss", "miss"]  # each LoRA fitted once, by one worker
    fitter = first if first["cache"][0]["lora"] == "miss" else second
    waiter = second if fitter is first else first
    third = morph(two_workers)
    assert {c["lora"] for c in third["cache"]} == {"hit"} and {c["latent"] for c in third["cache"]} == {"hit"}
    assert third["timings"]["lora"] < 0.25 * fitter["timings"]["lora"]
    print(f"\ncache across workers: fit {fitter['timings']['lora']:.2f} s on {fitter['worker_pid']}, "
          f"waited {waiter['timings']['lora']:.2f} s on {waiter['worker_pid']}, warm {third['timings']['lora']:.3f} s")


def test_a_client_sends_image_keys_instead_of_images(two_workers: TorchServeProcess) -> None:
    images = [encode(circle()), encode(square())]
    prompts = list(PROMPTS[:2])
    with MorphClient(two_workers.grpc_target, tokens=TokenSource(key_file=two_workers.key_file), retries=0) as client:
        sent = client.morph(images, prompts, OPTIONS, deadline_s=600)
        keys = [entry["image_key"] for entry in sent.metadata["cache"]]
        assert all(len(key) == 64 for key in keys) and keys[0] != keys[1]
        by_key = client.morph([wire.ImageRef(key) for key in keys], prompts, OPTIONS, deadline_s=600)
        assert [e["image_key"] for e in by_key.metadata["cache"]] == keys
        assert {e["lora"] for e in by_key.metadata["cache"]} == {"hit"}
        assert {e["latent"] for e in by_key.metadata["cache"]} == {"hit"}
        assert [p.data for p in by_key.parts] == [p.data for p in sent.parts]  # the same morph
        mixed = client.morph([images[0], wire.ImageRef(keys[1])], prompts, OPTIONS, deadline_s=600)
        assert [p.data for p in mixed.parts] == [p.data for p in sent.parts]
        with pytest.raises(MorphClientError) as missing:
            client.morph([wire.ImageRef("0" * 64), images[1]], prompts, OPTIONS, deadline_s=600)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert "not in this server's cache" in missing.value.details and "send the image" in missing.value.details
        with pytest.raises(MorphClientError) as malformed:
            client.morph([wire.ImageRef("../etc/passwd"), images[1]], prompts, OPTIONS, deadline_s=600)
        assert malformed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "image_ref_0" in malformed.value.details
