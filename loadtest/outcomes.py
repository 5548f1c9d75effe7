"""What became of each request: served, refused as busy, failed, or lost; and the ledger of
sent vs answered requests.

Why a separate "busy" outcome: TorchServe refuses a request whose model queue is full within a
millisecond or so. Counted with the morphs, thousands of instant refusals make the median
meaningless, so refusals get their own Locust series and their own counts. TorchServe 0.12
signals a full queue as HTTP 503 on REST, and on gRPC as status INTERNAL with the message
'Model "<name>" ... has no worker to serve inference request' (not RESOURCE_EXHAUSTED); a real
handler failure is also INTERNAL, so on gRPC only that message makes a refusal "busy".

Why a ledger: "every sent request was answered" cannot be read from Locust's statistics (a user
killed mid-request fires no event). Each user counts a request as sent before calling and as
answered / lost after; sent - answered - lost is what was never accounted for.
"""

from __future__ import annotations

import enum
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.morph_client import BUSY_MESSAGE
BUSY_SUFFIX = "busy"  # Locust series of refusals: "<mode> busy"


class Outcome(str, enum.Enum):
    OK = "ok"  # a morph came back
    BUSY = "busy"  # the server refused it at once: queue full
    ERROR = "error"  # the server answered with another error status (unexpected)
    LOST = "lost"  # no answer: deadline passed, connection failed (unexpected)


class ServerBusy(Exception):
    """The request was refused because the model's job queue was full (an expected outcome past
    capacity; its own series, never mixed with morph latencies)."""


class UnexpectedAnswer(Exception):
    """Any other failure; the load test fails when one occurs."""


# gRPC codes that mean the server never answered this request.
GRPC_LOST_CODES = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"})


def classify_grpc(code_name: str | None, details: str) -> Outcome:
    """Outcome of a failed gRPC call, from its status code name and message."""
    if code_name in ("INTERNAL", "UNAVAILABLE") and BUSY_MESSAGE in details:  # TorchServe / gateway
        return Outcome.BUSY
    if code_name in GRPC_LOST_CODES:
        return Outcome.LOST
    return Outcome.ERROR


def classify_http(status: int | None) -> Outcome:
    """Outcome of a REST answer (`None`: no HTTP answer at all, e.g. a timeout)."""
    if status is None:
        return Outcome.LOST
    if status == 200:
        return Outcome.OK
    if status == 503:
        return Outcome.BUSY
    return Outcome.ERROR


@dataclass
class Ledger:
    """Per-mode counts of sent requests and how each ended. One per Locust process."""

    sent: Counter = field(default_factory=Counter)
    outcomes: dict[str, Counter] = field(default_factory=dict)

    def send(self, mode: str) -> None:
        self.sent[mode] += 1

    def settle(self, mode: str, outcome: Outcome) -> None:
        self.outcomes.setdefault(mode, Counter())[outcome.value] += 1

    def totals(self) -> dict[str, int]:
        sent = sum(self.sent.values())
        ended = Counter()
        for counts in self.outcomes.values():
            ended.update(counts)
        answered = ended[Outcome.OK.value] + ended[Outcome.BUSY.value] + ended[Outcome.ERROR.value]
        lost = ended[Outcome.LOST.value]
        return {
            "sent": sent,
            "answered": answered,
            "ok": ended[Outcome.OK.value],
            "busy": ended[Outcome.BUSY.value],
            "error": ended[Outcome.ERROR.value],
            "lost": lost,
            "unaccounted": sent - answered - lost,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": self.totals(),
            "by_mode": {
                mode: {"sent": self.sent[mode], **dict(self.outcomes.get(mode, {}))}
                for mode in sorted(self.sent)
            },
        }

    def write(self, path: Path, **extra: Any) -> None:
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")


class Backoff:
    """Wait before the next request: the think time after an answer; after consecutive busy
    answers an exponentially growing, jittered wait (capped), so refused users do not hammer a
    full queue and the offered load past capacity stays meaningful."""

    def __init__(self, think_s: float, base_s: float, max_s: float, rng: random.Random) -> None:
        self.think_s, self.base_s, self.max_s, self.rng = think_s, base_s, max_s, rng
        self.refusals = 0

    def answered(self, outcome: Outcome) -> None:
        self.refusals = self.refusals + 1 if outcome is Outcome.BUSY else 0

    def next_wait(self) -> float:
        if not self.refusals:
            return self.think_s
        return min(self.max_s, self.base_s * 2 ** (self.refusals - 1)) * self.rng.uniform(0.5, 1.5)
