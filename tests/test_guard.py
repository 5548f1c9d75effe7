"""The guard's parts without a server: error translation, the watchdog's decisions, token
rotation timing, the control directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from morph_protocol.errors import ErrorCode, format_error
from morph_protocol.control import BUSY, ControlDir, Heartbeat
from guard.gateway import BUSY_DETAILS, ClientError, translate_error, translate_oip_error
from morph_protocol.management import ManagementError
from guard.tokens import TokenRotator, expirations
from guard.watchdog import Watchdog, WatchdogConfig, pid_alive


def test_errors_lose_the_java_class_and_tag_and_get_the_right_status_and_code() -> None:
    java = "\norg.pytorch.serve.http.InternalServerException"
    tagged = format_error(ErrorCode.INVALID_REQUEST, "invalid request: x") + java
    assert translate_error(grpc.StatusCode.INVALID_ARGUMENT, tagged) == ClientError(
        grpc.StatusCode.INVALID_ARGUMENT, "invalid request: x", ErrorCode.INVALID_REQUEST)
    busy = 'Model "diffmorpher" has no worker to serve inference request. Please use scale workers API'
    assert translate_error(grpc.StatusCode.INTERNAL, busy + java) == ClientError(
        grpc.StatusCode.UNAVAILABLE, BUSY_DETAILS, ErrorCode.BUSY)
    # TorchServe answers 507 as INTERNAL: the tag, not the text, makes it RESOURCE_EXHAUSTED.
    oom = translate_error(grpc.StatusCode.INTERNAL, format_error(ErrorCode.OUT_OF_MEMORY, "out of memory: reduce") + java)
    assert oom == ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory: reduce", ErrorCode.OUT_OF_MEMORY)
    assert translate_error(grpc.StatusCode.INTERNAL, "out of memory: reduce" + java) == ClientError(
        grpc.StatusCode.INTERNAL, "out of memory: reduce", None)  # untagged: no longer read from the words
    for died_code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED):
        died = translate_error(died_code, "Worker died." + java)
        assert died.status == grpc.StatusCode.ABORTED and "died" in died.details
        assert died.code == ErrorCode.WORKER_DIED
    down = translate_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert down.code == ErrorCode.UNREACHABLE and down.details.startswith("the model server is not reachable")


def test_oip_refusals_in_torchserve_words_get_codes() -> None:
    java = "\norg.pytorch.serve.http.InternalServerException"
    assert translate_oip_error(grpc.StatusCode.INTERNAL, "Model not found: nope" + java) == ClientError(
        grpc.StatusCode.NOT_FOUND, "Model not found: nope", ErrorCode.NOT_FOUND)
    assert translate_oip_error(grpc.StatusCode.INTERNAL, "Parameter model_name is required.") == ClientError(
        grpc.StatusCode.INVALID_ARGUMENT, "Parameter model_name is required.", ErrorCode.INVALID_REQUEST)
    assert translate_oip_error(grpc.StatusCode.INTERNAL, "Parameter x is fine") == ClientError(
        grpc.StatusCode.INTERNAL, "Parameter x is fine", None)
    off = translate_oip_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found: inference.X/ModelInfer")
    assert off.status == grpc.StatusCode.UNIMPLEMENTED and "ts_open_inference_protocol=true" in off.details


class FakeManagement:
    """The management API's answers, scripted (the real one is exercised end to end)."""

    def __init__(self, workers: list[dict]) -> None:
        self.workers = workers
        self.scaled: list[int] = []
        self.key_file = Path("/nonexistent")

    def describe(self, model: str) -> dict:
        return {"minWorkers": 1, "workers": self.workers}

    def scale(self, model: str, min_workers: int, timeout_s: float = 120.0) -> None:
        self.scaled.append(min_workers)


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_ready_worker_without_a_process_is_restarted_after_the_grace_period() -> None:
    pid = dead_pid()
    assert not pid_alive(pid)
    api = FakeManagement([{"pid": pid, "status": "READY"}])
    dog = Watchdog(api, None, WatchdogConfig("m", grace_s=3))
    report = dog.check(now=100.0)
    assert not report.healthy and "process is gone" in report.reasons[0]
    assert api.scaled == []  # seen once: TorchServe may be restarting it itself
    dog.check(now=104.0)
    assert api.scaled == [0, 1] and dog.events[0].kind == "dead"
    api.workers = [{"pid": os.getpid(), "status": "READY"}]
    assert dog.check(now=110.0).healthy
    assert dog.events[0].seconds == 10.0


def test_a_busy_worker_whose_heartbeat_stopped_is_killed(tmp_path: Path, monkeypatch) -> None:
    control = ControlDir(tmp_path)
    control.write_heartbeat(Heartbeat(pid=4242, state=BUSY, call_id="", started=0.0, beat=1000.0))
    api = FakeManagement([{"pid": 4242, "status": "READY"}])
    killed = []
    monkeypatch.setattr("guard.watchdog.pid_alive", lambda pid: True)
    monkeypatch.setattr("guard.watchdog.os.kill", lambda pid, sig: killed.append((pid, sig)))
    dog = Watchdog(api, control, WatchdogConfig("m", grace_s=2, wedge_after_s=60))
    assert dog.check(now=1050.0).healthy  # 50 s without a step: still fine
    assert not dog.check(now=1070.0).healthy and killed == []
    dog.check(now=1073.0)
    assert [pid for pid, _ in killed] == [4242] and dog.events[0].kind == "wedged"


def test_keys_are_rotated_at_half_their_lifetime(tmp_path: Path) -> None:
    """When the rotator rotates, on a fake API that rewrites nothing; that a rotation renews the
    key file, retires the old keys and is followed by the gateway: tests/test_e2e_tokens.py."""
    key_file = tmp_path / "key_file.json"
    now = time.time()

    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".123456789Z"

    key_file.write_text(json.dumps({
        "management": {"key": "m", "expiration time": iso(now + 50)},
        "inference": {"key": "i", "expiration time": iso(now + 20)},
        "API": {"key": "a"},
    }))
    assert set(expirations(key_file)) == {"management", "inference"}

    class Api:
        def __init__(self) -> None:
            self.key_file = key_file
            self.rotated: list[str] = []

        def rotate_token(self, kind: str) -> None:
            if kind == "management":
                raise ManagementError("refused")
            self.rotated.append(kind)

    api = Api()
    rotator = TokenRotator(api, lifetime_s=60)  # type: ignore[arg-type]
    assert rotator.rotate_due(now) == ["inference"]  # 20 s left of 60: due; 50 s left: not yet
    assert rotator.rotate_due(now + 25) == ["inference"] and "refused" in rotator.last_error


def test_cancel_markers_only_take_call_ids(tmp_path: Path) -> None:
    control = ControlDir(tmp_path)
    with pytest.raises(ValueError):
        control.cancel("../escape", "x")
    control.cancel("a" * 32, "cancelled by the client")
    assert control.cancel_reason("a" * 32) == "cancelled by the client"
    old = time.time() - 7200
    os.utime(control.cancel_marker("a" * 32), (old, old))
    assert control.prune_cancel_markers(older_than_s=3600) == 1


def test_idle_workers_with_a_waiting_queue_are_restarted(tmp_path: Path, monkeypatch) -> None:
    from morph_protocol.control import IDLE

    control = ControlDir(tmp_path)
    control.write_heartbeat(Heartbeat(pid=4242, state=IDLE, beat=1000.0))
    monkeypatch.setattr("guard.watchdog.pid_alive", lambda pid: True)

    class Queued(FakeManagement):
        pending = 0

        def describe(self, model: str) -> dict:
            return {**super().describe(model), "jobQueueStatus": {"pendingRequests": self.pending}}

    api = Queued([{"pid": 4242, "status": "READY"}])
    dog = Watchdog(api, control, WatchdogConfig("m", grace_s=2, stall_after_s=30))
    assert dog.check(now=1100.0).healthy  # idle for long, but nothing waits
    api.pending = 3
    assert dog.check(now=1010.0).healthy  # requests wait, but the worker was busy 10 s ago
    assert not dog.check(now=1100.0).healthy  # the wait held 90 s (its own grace): repaired now
    assert api.scaled == [0, 1] and dog.events[0].kind == "stalled"
