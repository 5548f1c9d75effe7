"""Finding workers that cannot serve and replacing them, with no operator.

Three failures TorchServe 0.12 does not repair by itself:
- dead: the management API reports a worker READY whose process is gone (the unary/stream trap,
  or any other path where the frontend lost track of its worker). Requests queue behind it
  forever. Repair: scale the model to 0 workers and back (TorchServe starts fresh ones).
- wedged: the worker process lives but its heartbeat (morph_protocol.control, written at every morph
  step) says busy and has not moved for `wedge_after_s`. Repair: SIGKILL it; TorchServe notices
  the dead process, fails its request ("Worker died.") and starts a new worker.
- stalled: requests wait in the queue while every worker's heartbeat has said idle for
  `stall_after_s` (the frontend lost its workers without noticing). Repair: as for dead.
A condition must hold on two consecutive checks `grace_s` apart, so TorchServe's own restarts
are never fought. The last report is what the health endpoint serves.
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
    stall_after_s: float = 60.0


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


@dataclass
class Watchdog:
    api: ManagementApi
    control: ControlDir | None
    config: WatchdogConfig
    events: list[HealEvent] = field(default_factory=list)
    report: HealthReport = field(default_factory=lambda: HealthReport(False, ["not checked yet"], [], 0.0))
    _suspects: dict[tuple[str, int], float] = field(default_factory=dict)

    def check(self, now: float | None = None) -> HealthReport:
        """One round: describe the model, find dead or wedged workers, repair them."""
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
        self._repair(found, now)
        self._close_events(ready, found, now)
        self.report = HealthReport(not reasons, reasons, workers, now)
        return self.report

    def _stalled(self, description: dict[str, Any], workers: list[dict[str, Any]], now: float,
                 reasons: list[str]) -> set[tuple[str, int]]:
        """Workers idle for `stall_after_s` while requests wait: the frontend stopped feeding them."""
        pending = int((description.get("jobQueueStatus") or {}).get("pendingRequests", 0) or 0)
        if pending <= 0 or self.control is None or not workers:
            return set()
        beats = [self.control.read_heartbeat(int(w.get("pid") or -1)) for w in workers]
        if any(b is None or b.state != IDLE or now - b.beat < self.config.stall_after_s for b in beats):
            return set()
        reasons.append(f"{pending} requests wait while every worker has been idle for {self.config.stall_after_s:.0f}+ s")
        return {("stalled", beat.pid) for beat in beats if beat is not None}

    def _repair(self, found: set[tuple[str, int]], now: float) -> None:
        self._suspects = {key: since for key, since in self._suspects.items() if key in found}
        for key in sorted(found):
            since = self._suspects.setdefault(key, now)
            if now - since < self.config.grace_s:
                continue  # seen once: TorchServe may be restarting it right now
            kind, pid = key
            if any(e.pid == pid and e.kind == kind and not e.healed for e in self.events):
                continue
            self.events.append(HealEvent(kind, pid, since))
            logger.error("%s worker %d: repairing", kind, pid)
            try:
                if kind == "wedged":
                    os.kill(pid, signal.SIGKILL)
                else:
                    self._restart_workers()
            except (ManagementError, OSError) as error:
                logger.error("repair of %s worker %d failed: %s", kind, pid, error)

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
