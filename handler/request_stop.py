"""When a morph must stop: the request's deadline and its cancellation marker (no framework import).

A caller that has stopped waiting gets nothing from a finished morph, and a worker busy with it
serves nobody else for minutes. So every request carries (or is given by the gateway) a
`deadline`, and the gateway marks cancelled calls in the control directory (morph_protocol.control).
`CallStop` turns both into the core's StopCheck; it also writes the worker's heartbeat, since it
is called at every step: a worker whose heartbeat stops while busy is wedged (the watchdog
replaces it).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

from morph_protocol import wire
from diffmorpher.config import ConfigError
from diffmorpher.interrupt import CANCELLED, DEADLINE, StopReason
from morph_protocol.control import BUSY, CALL_ID, IDLE, ControlDir, Heartbeat

HEARTBEAT_INTERVAL_S = 1.0
CANCEL_POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class CallControl:
    """The request's stop conditions: `deadline` (Unix seconds) and the gateway's `call_id`."""

    deadline: float | None = None
    call_id: str = ""

    def seconds_left(self, now: float | None = None) -> float | None:
        return None if self.deadline is None else self.deadline - (time.time() if now is None else now)


def _text(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("ascii").strip()
        except UnicodeDecodeError as error:
            raise ConfigError(f"field {key!r} must be ASCII text") from error
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise ConfigError(f"field {key!r} must be text, got {type(value).__name__}")


def parse_call_control(fields: Mapping[str, Any]) -> CallControl:
    """`deadline` and `call_id` from a request's input map, validated (cheap: read before the
    images are decoded, so an expired request costs nothing)."""
    if not isinstance(fields, Mapping):
        return CallControl()
    deadline = None
    text = _text(fields, wire.INPUT_DEADLINE)
    if text:
        try:
            deadline = float(text)
        except ValueError as error:
            raise ConfigError(f"field 'deadline' must be Unix time in seconds, got {text[:40]!r}") from error
        if not math.isfinite(deadline) or deadline <= 0:
            raise ConfigError(f"field 'deadline' must be a finite positive Unix time, got {text[:40]!r}")
    call_id = _text(fields, wire.INPUT_CALL_ID) or ""
    if call_id and not CALL_ID.match(call_id):
        raise ConfigError("field 'call_id' is set by the gateway (32 hex digits); remove it from the request")
    return CallControl(deadline, call_id)


class WorkerHeartbeat:
    """This worker's heartbeat file (nothing is written without a control directory)."""

    def __init__(self, control: ControlDir | None, pid: int | None = None) -> None:
        self.control = control
        self.pid = pid or os.getpid()
        self.call_id = ""
        self.started = 0.0
        self.last_written = 0.0

    def busy(self, call_id: str) -> None:
        self.call_id = call_id
        self.started = time.time()
        self._write(BUSY, self.started)

    def step(self, now: float) -> None:
        if now - self.last_written >= HEARTBEAT_INTERVAL_S:
            self._write(BUSY, now)

    def idle(self) -> None:
        self.call_id = ""
        self._write(IDLE, time.time())

    def _write(self, state: str, now: float) -> None:
        if self.control is None:
            return
        self.last_written = now
        try:
            self.control.write_heartbeat(Heartbeat(self.pid, state, self.call_id, self.started, now))
        except OSError:  # a full or read-only disk must not fail the morph
            pass


class CallStop:
    """The core's StopCheck for one request: deadline passed, or the gateway marked it cancelled."""

    def __init__(self, call: CallControl, control: ControlDir | None, heartbeat: WorkerHeartbeat) -> None:
        self.call = call
        self.control = control if call.call_id else None
        self.heartbeat = heartbeat
        self.started = time.time()
        self.last_cancel_poll = 0.0

    def __call__(self) -> StopReason | None:
        now = time.time()
        self.heartbeat.step(now)
        if self.call.deadline is not None and now >= self.call.deadline:
            return StopReason(
                DEADLINE,
                f"deadline exceeded: the morph was stopped {now - self.started:.1f} s after it started; "
                f"raise the deadline, or ask for fewer frames or steps",
            )
        if self.control is not None and now - self.last_cancel_poll >= CANCEL_POLL_INTERVAL_S:
            self.last_cancel_poll = now
            reason = self.control.cancel_reason(self.call.call_id)
            if reason is not None:
                return StopReason(CANCELLED, f"the call was {reason}; the morph was stopped")
        return None

    def check_before_start(self) -> StopReason | None:
        """A request that waited in the queue past its deadline is not started."""
        left = self.call.seconds_left()
        if left is not None and left <= 0:
            return StopReason(
                DEADLINE,
                f"deadline exceeded: the request waited {-left:.1f} s past its deadline in the "
                f"queue and was not started; raise the deadline or retry when the server is less busy",
            )
        return self()
