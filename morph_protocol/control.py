"""The control directory one server's guard and handler workers share (no torch, stdlib only).

TorchServe 0.12 gives a Python worker no way to learn that its client has gone, and gives the
frontend no way to see inside a worker. Both gaps are closed through files in one directory:

    <root>/cancel/<call_id>      written by the gateway when a call is cancelled or expires;
                                 the worker's StopCheck sees it and stops the morph
    <root>/workers/<pid>.json    written by each worker: idle/busy, which call, last step time;
                                 the watchdog reads it to find a worker that stopped working

The root comes from $DIFFMORPHER_CONTROL_DIR (the guard and TorchServe's workers inherit the
same environment). Writes are atomic (temporary file + rename), so a reader never sees half a
file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONTROL_DIR_ENV = "DIFFMORPHER_CONTROL_DIR"
CALL_ID = re.compile(r"^[0-9a-f]{32}$")
IDLE = "idle"
BUSY = "busy"


@dataclass(frozen=True)
class Heartbeat:
    """What a worker last said about itself. `beat` is the Unix time of its last morph step."""

    pid: int
    state: str  # IDLE or BUSY
    call_id: str = ""
    started: float = 0.0
    beat: float = 0.0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ControlDir:
    root: Path

    @classmethod
    def from_env(cls) -> "ControlDir | None":
        value = os.environ.get(CONTROL_DIR_ENV)
        return cls(Path(value)) if value else None

    # ------------------------------------------------------------------ cancellation
    def cancel_marker(self, call_id: str) -> Path:
        if not CALL_ID.match(call_id):  # never a path from a client: 32 hex digits only
            raise ValueError(f"call_id must be 32 hex digits, got {call_id[:40]!r}")
        return self.root / "cancel" / call_id

    def cancel(self, call_id: str, reason: str) -> None:
        _atomic_write(self.cancel_marker(call_id), reason)

    def cancel_reason(self, call_id: str) -> str | None:
        try:
            return self.cancel_marker(call_id).read_text() or "cancelled"
        except FileNotFoundError:
            return None

    def forget(self, call_id: str) -> None:
        self.cancel_marker(call_id).unlink(missing_ok=True)

    def prune_cancel_markers(self, older_than_s: float) -> int:
        """Remove markers of calls long finished; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for marker in (self.root / "cancel").glob("*"):
            try:
                if marker.stat().st_mtime < cutoff:
                    marker.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # ------------------------------------------------------------------ heartbeats
    def heartbeat_path(self, pid: int) -> Path:
        return self.root / "workers" / f"{int(pid)}.json"

    def write_heartbeat(self, beat: Heartbeat) -> None:
        _atomic_write(self.heartbeat_path(beat.pid), json.dumps(asdict(beat)))

    def read_heartbeat(self, pid: int) -> Heartbeat | None:
        try:
            return Heartbeat(**json.loads(self.heartbeat_path(pid).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def remove_heartbeat(self, pid: int) -> None:
        self.heartbeat_path(pid).unlink(missing_ok=True)
