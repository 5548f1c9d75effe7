"""Two workers of one TorchServe share the LoRA/latent cache: two concurrent morphs of the same
images land on different workers; one fits, the other waits on the key's lock and reuses the
result; a later morph on either worker is a full hit. Each is judged by the LoRA fits, LoRA
steps and inversions it ran (the result's `work`), since equal frames and "hit" labels prove
nothing. A client may then send the images' `image_key`s instead of the images: the same frames,
no upload, no fitting; an unknown key is NOT_FOUND and a malformed one INVALID_ARGUMENT, with
messages that say what to send."""

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


NOTHING_DONE = {"lora_fits": 0, "lora_steps": 0, "inversions": 0}


def test_workers_share_fitted_loras_and_latents(two_workers: TorchServeProcess) -> None:
    """Counted work, not the cache's own labels: a recompute gives the same frames and could
    say "hit" all the same. Each LoRA is fitted once, by one worker; a later morph fits and
    inverts nothing."""
    assert len(two_workers.worker_pids()) == 2
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: morph(two_workers), range(2))
    assert first["worker_pid"] != second["worker_pid"], "both morphs ran on one worker"
    fitter, waiter = sorted([first, second], key=lambda header: -header["work"]["lora_fits"])
    steps = OPTIONS["lora_steps"]
    assert fitter["work"]["lora_fits"] == 2 and fitter["work"]["lora_steps"] == 2 * steps, fitter["work"]
    assert waiter["work"]["lora_fits"] == 0 and waiter["work"]["lora_steps"] == 0, waiter["work"]  # it read them
    assert [c["lora"] for c in fitter["cache"]] == ["miss", "miss"] and [c["lora"] for c in waiter["cache"]] == ["hit", "hit"]
    third = morph(two_workers)
    assert third["work"] == NOTHING_DONE, third["work"]  # LoRAs and latents both read, on either worker
    assert third["timings"]["lora"] < 0.25 * fitter["timings"]["lora"]
    print(f"\ncache across workers: fit {fitter['timings']['lora']:.2f} s on {fitter['worker_pid']}, "
          f"waited {waiter['timings']['lora']:.2f} s on {waiter['worker_pid']}, warm {third['timings']['lora']:.3f} s; "
          f"work {fitter['work']} / {waiter['work']} / {third['work']}")


def test_a_client_sends_image_keys_instead_of_images(two_workers: TorchServeProcess) -> None:
    images = [encode(circle()), encode(square())]
    prompts = list(PROMPTS[:2])
    with MorphClient(two_workers.grpc_target, tokens=TokenSource(key_file=two_workers.key_file), retries=0) as client:
        sent = client.morph(images, prompts, OPTIONS, deadline_s=600)
        keys = [entry["image_key"] for entry in sent.metadata["cache"]]
        assert all(len(key) == 64 for key in keys) and keys[0] != keys[1]
        by_key = client.morph([wire.ImageRef(key) for key in keys], prompts, OPTIONS, deadline_s=600)
        assert [e["image_key"] for e in by_key.metadata["cache"]] == keys
        assert by_key.metadata["work"] == NOTHING_DONE, by_key.metadata["work"]  # no fit, no inversion
        assert [p.data for p in by_key.parts] == [p.data for p in sent.parts]  # the same morph
        mixed = client.morph([images[0], wire.ImageRef(keys[1])], prompts, OPTIONS, deadline_s=600)
        assert [p.data for p in mixed.parts] == [p.data for p in sent.parts]
        assert mixed.metadata["work"] == NOTHING_DONE, mixed.metadata["work"]
        with pytest.raises(MorphClientError) as missing:
            client.morph([wire.ImageRef("0" * 64), images[1]], prompts, OPTIONS, deadline_s=600)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert "not in this server's cache" in missing.value.details and "send the image" in missing.value.details
        with pytest.raises(MorphClientError) as malformed:
            client.morph([wire.ImageRef("../etc/passwd"), images[1]], prompts, OPTIONS, deadline_s=600)
        assert malformed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "image_ref_0" in malformed.value.details
