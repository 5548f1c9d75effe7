"""The watchdog's "stalled" rule without a server: requests wait while no worker makes progress.

Times are the watchdog's `now` (Unix seconds), heartbeats are files in a real control directory,
the management API is a fake that records scale calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.watchdog import Watchdog, WatchdogConfig
from morph_protocol.control import BUSY, IDLE, ControlDir, Heartbeat


class QueuedManagement:
    """describe() with workers and a queue; scale() recorded."""

    def __init__(self, workers: list[dict], min_workers: int = 1) -> None:
        self.workers = workers
        self.min_workers = min_workers
        self.pending = 0
        self.scaled: list[int] = []

    def describe(self, model: str) -> dict:
        return {"minWorkers": self.min_workers, "workers": self.workers,
                "jobQueueStatus": {"pendingRequests": self.pending, "remainingCapacity": 16 - self.pending}}

    def scale(self, model: str, min_workers: int, timeout_s: float = 120.0) -> None:
        self.scaled.append(min_workers)


@pytest.fixture()
def control(tmp_path: Path, monkeypatch) -> ControlDir:
    monkeypatch.setattr("guard.watchdog.pid_alive", lambda pid: pid > 0)  # every listed worker lives
    return ControlDir(tmp_path)


def beat(control: ControlDir, pid: int, state: str, at: float) -> None:
    control.write_heartbeat(Heartbeat(pid=pid, state=state, beat=at))


def dog(api: QueuedManagement, control: ControlDir) -> Watchdog:
    return Watchdog(api, control, WatchdogConfig("m", grace_s=2, stall_after_s=5, wedge_after_s=600))


def test_requests_waiting_on_an_idle_worker_turn_health_red_within_the_stall_window(control) -> None:
    beat(control, 4242, IDLE, at=1000.0)  # idle for a long time: an idle server is healthy
    api = QueuedManagement([{"pid": 4242, "status": "READY"}])
    watchdog = dog(api, control)
    assert watchdog.check(now=2000.0).healthy
    api.pending = 1  # a request arrives and nobody takes it
    assert watchdog.check(now=2001.0).healthy  # first seen waiting: the hand-off takes milliseconds
    assert watchdog.check(now=2005.0).healthy  # 4 s
    report = watchdog.check(now=2006.0)  # 5 s
    assert not report.healthy and report.pending == 1
    assert "1 requests wait while no worker has made progress for 5 s" in report.reasons[0]
    # The 5 s window held over several rounds: it is the grace, the repair starts now.
    assert api.scaled == [0, 1] and [e.kind for e in watchdog.events] == ["stalled"]
    api.workers = [{"pid": 4343, "status": "READY"}]  # the replacement, with its start-up beat
    beat(control, 4343, IDLE, at=2020.0)
    assert watchdog.check(now=2021.0).healthy  # the waiting request is its to take now
    assert watchdog.events[0].seconds == 20.0  # from the start of the wait (2001) to 2021


def test_a_busy_worker_with_an_old_beat_is_progress_not_a_stall(control) -> None:
    """A real SD step on CPU took 85 s: a busy worker between beats must not be restarted while
    requests queue behind it; only the wedge limit (600 s) applies to it."""
    beat(control, 4242, BUSY, at=1000.0)
    api = QueuedManagement([{"pid": 4242, "status": "READY"}])
    api.pending = 3
    watchdog = dog(api, control)
    for now in (1001.0, 1030.0, 1085.0, 1300.0, 1599.0):
        assert watchdog.check(now=now).healthy, now
    assert api.scaled == []
    assert not watchdog.check(now=1601.0).healthy  # wedged, the long rule


def test_every_heartbeat_restarts_the_stall_window(control) -> None:
    """Workers that keep finishing requests (an idle beat each) while the queue stays non-empty
    are making progress."""
    api = QueuedManagement([{"pid": 4242, "status": "READY"}])
    api.pending = 2
    watchdog = dog(api, control)
    for now in (1000.0, 1004.0, 1008.0, 1012.0):
        beat(control, 4242, IDLE, at=now - 1)  # a request finished a second ago
        assert watchdog.check(now=now).healthy, now
    assert not watchdog.check(now=1016.0).healthy  # 5 s since the last beat


def test_a_loading_worker_or_one_without_a_heartbeat_is_not_stalled(control) -> None:
    api = QueuedManagement([{"pid": 4242, "status": "UNLOADING"}])  # TorchServe's word while loading
    api.pending = 1
    watchdog = dog(api, control)
    for now in (1000.0, 1010.0, 1020.0):
        report = watchdog.check(now=now)
        assert report.reasons == ["0 of 1 workers ready"]  # red, but nothing to restart
    api.workers = [{"pid": 4242, "status": "READY"}]  # no heartbeat file: no control dir shared
    for now in (1030.0, 1040.0, 1050.0):
        assert watchdog.check(now=now).healthy
    assert api.scaled == [] and watchdog.events == []


def test_an_empty_queue_is_healthy_however_long_every_worker_idles(control) -> None:
    beat(control, 4242, IDLE, at=0.0)
    api = QueuedManagement([{"pid": 4242, "status": "READY"}])
    watchdog = dog(api, control)
    assert all(watchdog.check(now=now).healthy for now in (10.0, 1e4, 1e6))


def test_several_stalled_workers_are_replaced_by_one_scale_down_and_up(control) -> None:
    for pid in (11, 12, 13):
        beat(control, pid, IDLE, at=1000.0)
    api = QueuedManagement([{"pid": pid, "status": "READY"} for pid in (11, 12, 13)], min_workers=3)
    api.pending = 4
    watchdog = dog(api, control)
    for now in (1000.0, 1005.0, 1007.0):
        watchdog.check(now=now)
    assert api.scaled == [0, 3]  # once, at 1005
    assert sorted(e.pid for e in watchdog.events) == [11, 12, 13]


def test_one_busy_worker_among_idle_ones_is_progress(control) -> None:
    beat(control, 11, IDLE, at=1000.0)
    beat(control, 12, BUSY, at=1000.0)
    api = QueuedManagement([{"pid": 11, "status": "READY"}, {"pid": 12, "status": "READY"}], min_workers=2)
    api.pending = 1
    watchdog = dog(api, control)
    assert all(watchdog.check(now=now).healthy for now in (1000.0, 1010.0, 1100.0))


def test_the_reason_is_published_before_the_restart_blocks_the_loop(control) -> None:
    """A scale up waits for the new worker to load (~20 s here): /healthz serves the report
    of the round that started it, so that report must already be red."""
    beat(control, 4242, IDLE, at=1000.0)
    api = QueuedManagement([{"pid": 4242, "status": "READY"}])
    api.pending = 1
    watchdog = dog(api, control)
    seen_while_scaling: list[bool] = []
    api.scale = lambda model, n, timeout_s=120.0: seen_while_scaling.append(watchdog.report.healthy)
    for now in (1000.0, 1005.0):
        watchdog.check(now=now)
    assert seen_while_scaling == [False, False]  # scale to 0 and back, both under a red report
