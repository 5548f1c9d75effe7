"""Waiting for a cache lock is part of a request: it ends at the request's deadline or
cancellation, beats the worker's heartbeat while it lasts (so the watchdog does not take the
waiting worker for a wedged one), and gives up at the store's last resort with its own error.
Lock files are deleted after use without letting two processes compute one key, and a put costs
a bounded number of stats however large the store (diffmorpher/cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffmorpher.cache import LOCK_POLL_S, CacheWaitTimeout, DiskStore, TensorCache
from diffmorpher.interrupt import CANCELLED, DEADLINE, MorphStopped, StopReason

KEY = "ab" * 32

# A process of its own that holds a key's lock (the flock a DiskStore takes) until killed: the
# other worker in the middle of a long fit. Plain Python: it starts in a fraction of a second.
HOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+b")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


class Holder:
    """Another process holding the lock file of `key` in `store`."""

    def __init__(self, store: DiskStore, key: str) -> None:
        path = store.root / "locks" / f"{key}.lock"
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "held"

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait(10)


class DeadlineAfter:
    """A StopCheck like the server's: stops after `seconds` (or on cancel), records its calls."""

    def __init__(self, seconds: float, kind: str = DEADLINE) -> None:
        self.deadline = time.monotonic() + seconds
        self.kind = kind
        self.calls: list[float] = []

    def __call__(self) -> StopReason | None:
        now = time.monotonic()
        self.calls.append(now)
        return StopReason(self.kind, f"{self.kind}: stopped") if now >= self.deadline else None


def _never_computed(keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    raise AssertionError("computed a key another process holds")


@pytest.mark.parametrize("kind", [DEADLINE, CANCELLED])
def test_a_lock_wait_ends_at_the_requests_deadline_or_cancellation(tmp_path: Path, kind: str) -> None:
    store = DiskStore(tmp_path)
    cache = TensorCache(store)
    with Holder(store, KEY):
        stop = DeadlineAfter(1.0, kind)
        started = time.monotonic()
        with pytest.raises(MorphStopped) as stopped:
            cache.get_or_compute_many([KEY], _never_computed, stop)
        waited = time.monotonic() - started
    assert stopped.value.reason.kind == kind
    assert "waiting" in str(stopped.value) and "another worker's fit of the same image" in str(stopped.value)
    assert 1.0 <= waited < 1.0 + 3 * LOCK_POLL_S + 0.3
    gaps = [b - a for a, b in zip(stop.calls, stop.calls[1:])]
    assert len(stop.calls) >= 8 and max(gaps) < 3 * LOCK_POLL_S  # asked (and beating) all along
    # Once the holder is gone the key is this worker's.
    value, hit = cache.get_or_compute(KEY, lambda: {"x": torch.ones(2)}, DeadlineAfter(5.0))
    assert not hit and float(value["x"].sum()) == 2.0
    print(f"\nlock wait stopped after {waited:.2f} s (deadline 1.0 s), stop asked {len(stop.calls)} times")


def test_the_last_resort_wait_gives_up_with_its_own_error(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, lock_timeout_s=0.5)
    with Holder(store, KEY), pytest.raises(CacheWaitTimeout, match="another worker's fit of the same image"):
        with store.lock(KEY):
            pass


def test_lock_files_are_deleted_after_use(tmp_path: Path) -> None:
    cache = TensorCache(DiskStore(tmp_path))
    for index in range(50):
        cache.get_or_compute(f"{index:02x}" * 32, lambda: {"x": torch.zeros(1)})
    assert list((tmp_path / "locks").iterdir()) == []
    assert len(list((tmp_path / "entries").iterdir())) == 50


def test_a_waiter_on_a_deleted_lock_file_locks_the_paths_new_file(tmp_path: Path) -> None:
    """The unlink race: a holder deletes its lock file on release; a waiter that was blocked on
    that file must not count it as the key's lock, since a newcomer meanwhile locked the file now
    at the path."""
    store = DiskStore(tmp_path)
    path = tmp_path / "locks" / f"{KEY}.lock"
    acquired = threading.Event()

    def waiter() -> None:
        with store.lock(KEY, DeadlineAfter(30.0)):
            acquired.set()

    first = Holder(store, KEY)
    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(3 * LOCK_POLL_S)  # the waiter has opened the first holder's file and polls it
    path.unlink()  # what the first holder does on release, while still holding it
    with Holder(store, KEY):  # a newcomer creates and locks the path's new file
        first.__exit__()  # the first holder's file is free now, but no longer the key's lock
        assert not acquired.wait(1.0)
    assert acquired.wait(2.0)  # the newcomer released: the waiter holds the key
    thread.join(5)


# Several processes race for the same keys, each counting what it computes in a shared file
# (one O_APPEND line per computation: atomic for short writes).
RACER = """
import sys, torch
from pathlib import Path
from diffmorpher.cache import DiskStore, TensorCache
root, log, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cache = TensorCache(DiskStore(root))
for index in range(count):
    key = f"{index:02x}" * 32
    def compute():
        with open(log, "a") as stream:
            stream.write(key + "\\n")
        return {"x": torch.full((4,), float(index))}
    value, _ = cache.get_or_compute(key, compute)
    assert float(value["x"][0]) == index
"""


def test_racing_processes_compute_each_key_once_and_leave_no_lock_files(tmp_path: Path) -> None:
    root, log, count = tmp_path / "cache", tmp_path / "computed.log", 40
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(log), str(count)], env=env)
              for _ in range(3)]
    assert [racer.wait(120) for racer in racers] == [0, 0, 0]
    computed = log.read_text().split()
    assert len(computed) == count and len(set(computed)) == count  # every key once, by one process
    assert list((root / "locks").iterdir()) == []


class StatCounter:
    """Counts the file system's stat and directory-listing calls (what eviction used to repeat)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("stat", "lstat", "scandir", "listdir"):
            monkeypatch.setattr(os, name, self._counted(getattr(os, name)))

    def _counted(self, function):
        def counted(*args, **kwargs):
            self.calls += 1
            return function(*args, **kwargs)

        return counted


def test_a_put_costs_a_bounded_number_of_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskStore(tmp_path, max_bytes=10**9)
    counter = StatCounter(monkeypatch)
    puts = 1000
    for index in range(puts):
        store.put(f"{index:04x}" * 16, bytes(100))
    print(f"\n{puts} puts under the cap: {counter.calls} stat/listdir calls")
    assert counter.calls <= 3 * puts  # one scan at the first put, then O(1) per put (was ~puts**2 / 2)
    assert int((tmp_path / "size").read_text()) == store.size_bytes == puts * (100 + 36)


def test_eviction_keeps_the_cap_and_the_newest_entries_at_o1_stats_per_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = 100 + 36  # payload and seal
    store = DiskStore(tmp_path, max_bytes=100 * entry)
    counter = StatCounter(monkeypatch)
    keys = [f"{index:04x}" * 16 for index in range(1000)]
    for index, key in enumerate(keys):
        store.put(key, bytes(100))
        os.utime(store.path(key), (1000.0 + index, 1000.0 + index))  # distinct ages, oldest first
        if index % 100 == 99:
            assert store.size_bytes <= store.max_bytes
    stats = counter.calls
    present = {path.name.removesuffix(".bin") for path in (tmp_path / "entries").iterdir()}
    print(f"\n1000 puts over a 100-entry cap: {stats} stat/listdir calls, {len(present)} entries kept")
    assert present == set(keys[-100:])  # least recently used went first
    assert stats <= 10 * len(keys)


class OneWorker:
    """The management API's description of a model with one worker (the watchdog reads it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def describe(self, model: str) -> dict:
        return {"minWorkers": 1, "workers": [{"pid": self.pid, "status": "BUSY"}], "jobQueueStatus": {}}

    def scale(self, model: str, workers: int) -> None:  # the watchdog's repair of a dead worker
        pass


def test_the_watchdog_does_not_take_a_worker_waiting_on_a_lock_for_wedged(tmp_path: Path) -> None:
    """The server's own StopCheck (request_stop.CallStop, which writes the heartbeat) and the
    guard's own wedge check, with a wedge bound (1.5 s) shorter than the wait (3 s deadline)."""
    from guard.watchdog import Watchdog, WatchdogConfig
    from handler.request_stop import CallControl, CallStop, WorkerHeartbeat
    from morph_protocol.control import ControlDir

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # what SIGKILL would hit
    pid = worker.pid  # the waiting worker, as the watchdog knows it
    control = ControlDir(tmp_path / "control")
    heartbeat = WorkerHeartbeat(control, pid)
    heartbeat.busy("")
    stop = CallStop(CallControl(deadline=time.time() + 3.0), control, heartbeat)
    dog = Watchdog(OneWorker(pid), control, WatchdogConfig("m", grace_s=0.5, wedge_after_s=1.5))
    store = DiskStore(tmp_path / "cache")
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            TensorCache(store).get_or_compute_many([KEY], _never_computed, stop)
        except BaseException as error:  # noqa: BLE001 - inspected below
            outcome.append(error)

    with Holder(store, KEY):
        waiter = threading.Thread(target=wait)
        started = time.monotonic()
        waiter.start()
        reports = []
        while waiter.is_alive() and time.monotonic() - started < 6.0:
            reports.append(dog.check())
            time.sleep(0.25)
        waited = time.monotonic() - started
    waiter.join(10)
    survived = worker.poll() is None
    worker.kill()
    worker.wait(10)
    assert survived and all(report.healthy for report in reports), [r.reasons for r in reports if not r.healthy]
    assert len(outcome) == 1 and isinstance(outcome[0], MorphStopped) and outcome[0].reason.kind == DEADLINE
    assert 2.9 <= waited < 3.6 and len(reports) >= 10
