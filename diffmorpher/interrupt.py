"""Stopping a morph part-way: deadlines and cancellations reach the core as a `StopCheck`.

A morph runs for seconds to hours; a server must be able to give its worker back when the client
has gone or its deadline has passed. The core knows nothing of servers, so the caller passes a
`StopCheck`: a function the pipeline calls between LoRA steps, denoising steps and frame
batches. It returns None to go on, or a `StopReason` to stop; the pipeline then raises
`MorphStopped`. It is plain Python (no tensor is read), so calling it every step costs nothing on
a GPU: no host synchronisation inside the denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StopReason:
    """Why a morph must stop: `kind` is "deadline" or "cancelled"; `message` is for people."""

    kind: str
    message: str


StopCheck = Callable[[], StopReason | None]

DEADLINE = "deadline"
CANCELLED = "cancelled"


class MorphStopped(Exception):
    """Raised by the pipeline when its StopCheck asked it to stop; no result is produced."""

    def __init__(self, reason: StopReason, stage: str = "") -> None:
        self.reason = reason
        self.stage = stage
        where = f" during {stage}" if stage else ""
        super().__init__(f"{reason.message}{where}")


def never_stop() -> StopReason | None:
    return None


def raise_if_stopped(check: StopCheck, stage: str) -> None:
    """Call `check` and raise MorphStopped (naming the stage) when it says stop."""
    reason = check()
    if reason is not None:
        raise MorphStopped(reason, stage)
