"""Finding workers that cannot serve and replacing them, with no operator.

Three failures TorchServe 0.12 does not repair by itself:
- dead: the management API reports a worker READY whose process is gone (the unary/stream trap,
  or any other path where the frontend lost track of its worker). Requests queue behind it
  forever. Repair: scale the model to 0 workers and back (TorchServe starts fresh ones).
- wedged: the worker process lives but its heartbeat (morph_protocol.control, written at every morph
  step) says busy and has not moved for `wedge_after_s`. Repair: SIGKILL it; TorchServe notices
  the dead process, fails its request ("Worker died.") and starts a new worker. This stays long
  (600 s): one step of a real model on a CPU took 85 s, and a busy worker's beats come per step.
- stalled: requests wait while no worker makes progress. The rule, evaluated each round: the
  frontend's queue holds requests (`jobQueueStatus.pendingRequests` > 0), no READY/BUSY worker
  whose process lives says busy, every such worker has a heartbeat, and neither the queue's wait
  (as this watchdog first saw it) nor any worker's newest heartbeat is younger than
  `stall_after_s` (3 s). This is what the trap on TorchServe's internal port looks like when the
  dropped worker's process does not exit, and what any other frontend fault that stops feeding
  workers looks like. Repair: as for dead.
  Why it cannot fire on a working server: a worker that takes a request writes a busy beat
  within milliseconds and one that finishes writes an idle beat, so requests never wait that
  long with every worker idle (the widest gap: an idle beat, then a result of up to 256 MB sent
  before the next request is taken, well under a second). Not stalled: a busy worker, however
  old its last beat (a long step is the wedge rule's business); an idle server with an empty
  queue; workers still loading (not READY; the report already says "0 of N workers ready") or
  without a heartbeat file (no shared control directory: nothing to judge by). A false alarm
  would cost a restart but no work: no worker is busy, and the waiting requests stay queued.
A condition is reported (the health endpoint turns 503 with it as the reason) as soon as it is
seen, and repaired once it has held on two consecutive checks `grace_s` apart, so TorchServe's
own restarts are never fought (a stall's quiet window counts: it has held since it began). All
restarts one round finds are one scale down and up. The last report is what the health endpoint
serves.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from morph_protocol.control import BUSY, IDLE, ControlDir
from morph_protocol.management import ManagementApi, ManagementError

logger = logging.getLogger(__name__)

LIVE_STATES = ("READY", "BUSY")


@dataclass(frozen=True)
class WatchdogConfig:
    model: str
    interval_s: float = 2.0
    grace_s: float = 4.0
    wedge_after_s: float = 600.0
    stall_after_s: float = 3.0


@dataclass
class HealEvent:
    kind: str  # "dead", "wedged" or "stalled"
    pid: int
    detected: float  # Unix time the condition was first seen
    healed: float = 0.0  # Unix time a working worker was back (0: not yet)

    @property
    def seconds(self) -> float | None:
        return round(self.healed - self.detected, 2) if self.healed else None


@dataclass
class HealthReport:
    healthy: bool
    reasons: list[str]
    workers: list[dict[str, Any]]
    checked: float
    pending: int = 0  # requests waiting in the frontend's queue


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it only waits to be reaped
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pending(description: dict[str, Any]) -> int:
    """Requests in the model's job queue that no worker has taken yet (the management API)."""
    return int((description.get("jobQueueStatus") or {}).get("pendingRequests", 0) or 0)


@dataclass
class Watchdog:
    api: ManagementApi
    control: ControlDir | None
    config: WatchdogConfig
    events: list[HealEvent] = field(default_factory=list)
    report: HealthReport = field(default_factory=lambda: HealthReport(False, ["not checked yet"], [], 0.0))
    _suspects: dict[tuple[str, int], float] = field(default_factory=dict)
    _waiting_since: float | None = None  # first round that saw requests wait with no worker busy

    def check(self, now: float | None = None) -> HealthReport:
        """One round: describe the model, find dead, wedged or stalled workers, repair them."""
        now = time.time() if now is None else now
        try:
            description = self.api.describe(self.config.model)
        except ManagementError as error:
            self.report = HealthReport(False, [f"management API: {error}"], [], now)
            return self.report
        workers = description.get("workers", [])
        min_workers = int(description.get("minWorkers", 1) or 1)
        reasons, found = [], set()
        for worker in workers:
            pid = int(worker.get("pid") or -1)
            status = str(worker.get("status", ""))
            if status in LIVE_STATES and not pid_alive(pid):
                found.add(("dead", pid))
                reasons.append(f"worker {pid} is {status} but its process is gone")
            beat = self.control.read_heartbeat(pid) if self.control is not None and pid > 0 else None
            if beat is not None and beat.state == BUSY and now - beat.beat > self.config.wedge_after_s:
                found.add(("wedged", pid))
                reasons.append(f"worker {pid} has made no progress for {now - beat.beat:.0f} s")
        found |= self._stalled(description, workers, now, reasons)
        ready = [w for w in workers if w.get("status") in LIVE_STATES and pid_alive(int(w.get("pid") or -1))]
        if len(ready) < min_workers:
            reasons.append(f"{len(ready)} of {min_workers} workers ready")
        # Published before the repair: a restart blocks this loop while the workers load, and the
        # health endpoint must say why it is red meanwhile.
        self.report = HealthReport(not reasons, reasons, workers, now, _pending(description))
        self._repair(found, now)
        self._close_events(ready, found, now)
        return self.report

    def _stalled(self, description: dict[str, Any], workers: list[dict[str, Any]], now: float,
                 reasons: list[str]) -> set[tuple[str, int]]:
        """Requests wait while no live worker is busy and no heartbeat has moved for
        `stall_after_s`: the frontend stopped feeding its workers (the rule: module docstring)."""
        pending = _pending(description)
        pids = [int(w.get("pid") or -1) for w in workers if w.get("status") in LIVE_STATES]
        live = [pid for pid in pids if pid_alive(pid)]
        beats = [self.control.read_heartbeat(pid) for pid in live] if self.control is not None else []
        if pending <= 0 or not beats or any(b is None or b.state != IDLE for b in beats):
            self._waiting_since = None
            return set()
        if self._waiting_since is None:
            self._waiting_since = now
        quiet = now - max(self._waiting_since, *(b.beat for b in beats))
        if quiet < self.config.stall_after_s:
            return set()
        reasons.append(f"{pending} requests wait while no worker has made progress for {quiet:.0f} s "
                       f"(every worker idle; limit {self.config.stall_after_s:.0f} s)")
        found = {("stalled", beat.pid) for beat in beats if beat is not None}
        for key in found:  # the quiet window held over several rounds: it counts as the grace
            self._suspects.setdefault(key, now - quiet)
        return found

    def _repair(self, found: set[tuple[str, int]], now: float) -> None:
        self._suspects = {key: since for key, since in self._suspects.items() if key in found}
        restart = False
        for key in sorted(found):
            since = self._suspects.setdefault(key, now)
            if now - since < self.config.grace_s:
                continue  # seen once: TorchServe may be restarting it right now
            kind, pid = key
            if any(e.pid == pid and e.kind == kind and not e.healed for e in self.events):
                continue
            self.events.append(HealEvent(kind, pid, since))
            logger.error("%s worker %d: repairing", kind, pid)
            if kind == "wedged":
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as error:
                    logger.error("repair of wedged worker %d failed: %s", pid, error)
            else:
                restart = True
        if restart:  # one scale down and up replaces every worker, however many were found
            try:
                self._restart_workers()
            except ManagementError as error:
                logger.error("restarting the workers failed: %s", error)
            self._waiting_since = None

    def _restart_workers(self) -> None:
        description = self.api.describe(self.config.model)
        min_workers = int(description.get("minWorkers", 1) or 1)
        self.api.scale(self.config.model, 0)
        self.api.scale(self.config.model, min_workers)

    def _close_events(self, ready: list[dict[str, Any]], found: set[tuple[str, int]], now: float) -> None:
        """An event is healed once a live worker other than the failed one is ready."""
        ready_pids = {int(w.get("pid") or -1) for w in ready}
        for event in self.events:
            if not event.healed and (ready_pids - {event.pid}) and (event.kind, event.pid) not in found:
                event.healed = now
                logger.warning("%s worker %d replaced after %.1f s", event.kind, event.pid, now - event.detected)
