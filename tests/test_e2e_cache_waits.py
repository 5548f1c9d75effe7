"""A served request waiting on the cache lock of another worker's fit of the same image: with a
3 s deadline it ends with DEADLINE_EXCEEDED (the worker's answer, saying what it waited for)
within 5 s, its heartbeat advances all through the wait so the guard's watchdog (here with
--wedge-after 2 s, shorter than the wait) leaves it alone, and the same worker then serves a
good request. "Another worker" is a process of the test's own that holds the key's lock file in
the server's cache directory, as a worker busy fitting that image does."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from client.morph_client import MorphClient, MorphClientError
from diffmorpher.cache import DiskStore
from launcher.torchserve import TorchServeProcess
from morph_protocol.control import BUSY, ControlDir
from morph_protocol.keyfile import TokenSource
from reliability.corpus import PROMPTS, circle, encode, square
from tests.test_cache_waits import Holder

pytestmark = pytest.mark.slow

OPTIONS = {"num_frames": 2, "lora_steps": 5, "num_inference_steps": 2, "use_reschedule": False, "seed": 3}
WEDGE_AFTER_S = 2.0
DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    guard_args = ("--interval", "0.5", "--wedge-after", str(WEDGE_AFTER_S))
    with TorchServeProcess(tmp_path_factory.mktemp("cache-waits") / "server", model_store,
                           guard_args=guard_args) as process:
        yield process


def test_a_request_waiting_on_another_workers_fit_ends_at_its_deadline(server: TorchServeProcess) -> None:
    images, prompts = [encode(circle()), encode(square())], list(PROMPTS[:2])
    control = ControlDir(server.control_dir)
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
        first = client.morph(images, prompts, OPTIONS, deadline_s=120).metadata
        pid, lora_key = first["worker_pid"], first["cache"][0]["lora_key"]
        store = DiskStore(server.cache_dir)
        store.path(lora_key).unlink()  # the LoRA is needed again, and another worker is fitting it
        beats: list[tuple[float, str, float]] = []
        waiting = threading.Event()

        def sample() -> None:
            while not waiting.wait(0.2):
                beat = control.read_heartbeat(pid)
                if beat is not None:
                    beats.append((time.time(), beat.state, beat.beat))

        with Holder(store, lora_key):
            sampler = threading.Thread(target=sample)
            sampler.start()
            started = time.monotonic()
            try:
                with pytest.raises(MorphClientError) as stopped:
                    client.morph(images, prompts, OPTIONS, deadline_s=DEADLINE_S)
            finally:
                elapsed = time.monotonic() - started
                waiting.set()
                sampler.join()
        assert stopped.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, stopped.value
        assert "another worker's fit of the same image" in stopped.value.details
        assert elapsed < 5.0
        busy = [beat for _, state, beat in beats if state == BUSY]
        advances = [b - a for a, b in zip(busy, busy[1:]) if b > a]
        assert len(advances) >= 2 and busy[-1] - busy[0] >= 1.5  # beating while it waited
        quiet = max(now - beat for now, state, beat in beats if state == BUSY)
        assert quiet < WEDGE_AFTER_S  # never as old as the watchdog's wedge bound
        time.sleep(2 * WEDGE_AFTER_S)  # a watchdog that had judged it wedged would have killed it by now
        assert server.worker_pid() == pid
        ready = time.monotonic()
        after = client.morph(images, prompts, OPTIONS, deadline_s=120).metadata
        assert after["worker_pid"] == pid and after["cache"][0]["lora"] == "miss"  # fitted now, by this worker
        assert after["num_frames"] == 2
    print(f"\nDEADLINE_EXCEEDED after {elapsed:.2f} s (deadline {DEADLINE_S} s) while another process held "
          f"the lock; heartbeat advanced {len(advances)} times, oldest {quiet:.2f} s (wedge bound "
          f"{WEDGE_AFTER_S} s); then a good request in {time.monotonic() - ready:.2f} s on the same worker")
