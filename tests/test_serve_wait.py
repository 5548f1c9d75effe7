"""`make serve`'s wait (python -m client wait --model-ready, morph_protocol.management): ready
only when a morph would be served, and a worker that dies loading fails the wait at once with
its error instead of a timeout.

Real TorchServes on free ports (launcher.torchserve), started without waiting so that the
client's wait is what waits: one serving the session's archive (a morph right after the wait
must succeed, and the wait must have lasted until the worker finished loading), and one whose
UNet weights are corrupt (TorchServe retries such a worker forever; the wait must not).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from morph_protocol.keyfile import TokenSource
from morph_protocol.management import WORKER_DIED, worker_death
from client.morph_client import MorphClient
from launcher.archive import export_model
from launcher.torchserve import TorchServeProcess
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT, demo_inputs

TINY = {"num_frames": 3, "lora_steps": 2, "num_inference_steps": 4, "use_reschedule": False, "seed": 1}
LOADED = "model identity for the cache"  # the handler's last line of initialize()


def client_wait(server: TorchServeProcess, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    command = [
        sys.executable, "-m", "client", "--target", server.grpc_target, "--key-file", str(server.key_file),
        "wait", "--model-ready", "--management-url", server.url("management", ""),
        "--model-log", str(server.model_log), "--log-offset", "0", "--timeout", str(timeout_s),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s + 60)
    return done, time.monotonic() - started


@contextmanager
def started(server: TorchServeProcess) -> Iterator[TorchServeProcess]:
    """The server started without waiting for its worker (the wait under test does), stopped after."""
    try:
        yield server.start(wait=False)
    finally:
        server.stop()


def log_time(line: str) -> datetime:
    """A TorchServe log line's local timestamp ("2026-12-03T09:22:14,042 ...")."""
    return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f")


def test_worker_death_reads_the_traceback_s_last_error(tmp_path: Path) -> None:
    prefix = "2026-12-03T09:22:29,556 [INFO ] W-9000-diffmorpher_1.0-stdout MODEL_LOG - "
    log = tmp_path / "model_log.log"
    log.write_text(f"{prefix}loading model\n")
    offset = log.stat().st_size
    assert worker_death(log, 0) is None
    with log.open("a") as handle:
        handle.write(f"{prefix}ValueError: an earlier worker's\n{prefix}Torch worker started.\n{prefix}{WORKER_DIED}\n"
                     f"{prefix}Traceback (most recent call last):\n{prefix}  File \"x.py\", line 1\n"
                     f"{prefix}OSError: Unable to load weights from checkpoint file\n"
                     f"{prefix}Listening on port: /tmp/.ts.sock.9000\n{prefix}KeyError: the next worker's\n")
    assert worker_death(log, offset) == "OSError: Unable to load weights from checkpoint file"
    assert worker_death(log, log.stat().st_size) is None  # only what was written after the offset
    assert worker_death(tmp_path / "absent.log") is None


@pytest.mark.slow
def test_wait_returns_when_a_morph_is_served(tmp_path: Path, model_store: Path) -> None:
    wall_before = datetime.now()
    with started(TorchServeProcess(tmp_path / "server", model_store)) as server:
        done, waited = client_wait(server, 300)
        wall_after = datetime.now()
        assert done.returncode == 0, done.stdout + done.stderr
        assert "READY" in done.stdout and "is ready" in done.stdout, done.stdout
        # The wait lasted at least until the worker's handler had loaded the model.
        loaded = [log_time(line) for line in server.model_log.read_text().splitlines() if LOADED in line]
        assert loaded, server.log_tail()
        assert wall_before <= loaded[0] <= wall_after
        # And a morph right after it is served.
        with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
            result = client.morph(*demo_inputs(), TINY, deadline_s=300)
        assert len(result.metadata["alphas"]) == TINY["num_frames"] and result.parts, result.metadata


@pytest.mark.slow
def test_wait_fails_at_once_when_the_worker_dies_loading(tmp_path: Path) -> None:
    source = EMBEDDED_MODEL if (EMBEDDED_MODEL / "unet").is_dir() else pytest.skip("no embedded model")
    model = tmp_path / "model"
    shutil.copytree(source, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    store = export_model(model, tmp_path / "store", "--archive-format", "no-archive", quiet=True)
    server = TorchServeProcess(tmp_path / "server", store, archive="diffmorpher", guard=False)
    with started(server):
        done, waited = client_wait(server, 240)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "died while loading" in done.stderr and "Unable to load weights" in done.stderr, done.stderr
        assert "not READY after" not in done.stderr
        assert waited < 60, done.stderr
        # The launcher's wait is the same one.
        begun = time.monotonic()
        with pytest.raises(RuntimeError, match="Unable to load weights"):
            server.wait_ready(240)
        assert time.monotonic() - begun < 60
