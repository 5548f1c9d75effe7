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
answered / lost after; sent - answered - lost is what was never accounted for. It counts per
mode and per target (replica), with the status codes each target answered, so a run over several
replicas shows that each one served.
"""

from __future__ import annotations

import enum
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morph_protocol.torchserve import BUSY_MESSAGE
from morph_protocol.errors import ErrorCode

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


def classify_grpc(code_name: str | None, details: str, error_code: ErrorCode | None = None) -> Outcome:
    """Outcome of a failed gRPC call, from its status code name and the typed code the gateway
    sent (morph_protocol.errors); TorchServe called directly says "busy" only in its message."""
    if error_code is not None:
        if error_code == ErrorCode.BUSY:
            return Outcome.BUSY
    elif code_name in ("INTERNAL", "UNAVAILABLE") and BUSY_MESSAGE in details:  # TorchServe itself
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


# Answers that every further request would get too (bad options, bad token, no such model):
# the run stops at the first one instead of sending thousands of them.
REFUSED_FOR_GOOD_GRPC = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"})
REFUSED_FOR_GOOD_HTTP = frozenset({400, 401, 403, 404})


def refused_for_good(status: str | int | None) -> bool:
    """True for a gRPC code name or HTTP status that repeating the request cannot change."""
    return status in REFUSED_FOR_GOOD_GRPC or status in REFUSED_FOR_GOOD_HTTP


OUTCOME_KEYS = tuple(outcome.value for outcome in Outcome)


@dataclass
class Ledger:
    """Per-mode and per-target counts of sent requests and how each ended, plus the status codes
    each target answered with ("gRPC OK", "HTTP 503", ...). One per Locust process; the runner
    merges the workers' ledgers (`merge`)."""

    sent: Counter = field(default_factory=Counter)
    outcomes: dict[str, Counter] = field(default_factory=dict)
    target_sent: Counter = field(default_factory=Counter)
    target_outcomes: dict[str, Counter] = field(default_factory=dict)
    target_codes: dict[str, Counter] = field(default_factory=dict)

    def send(self, mode: str, target: str = "") -> None:
        self.sent[mode] += 1
        self.target_sent[target] += 1

    def settle(self, mode: str, outcome: Outcome, target: str = "", code: str = "") -> None:
        self.outcomes.setdefault(mode, Counter())[outcome.value] += 1
        self.target_outcomes.setdefault(target, Counter())[outcome.value] += 1
        if code:
            self.target_codes.setdefault(target, Counter())[code] += 1

    def in_flight(self) -> int:
        """Requests sent and not yet answered or lost."""
        return self.totals()["unaccounted"]

    @staticmethod
    def _totals(sent: int, ended: Counter) -> dict[str, int]:
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

    def totals(self) -> dict[str, int]:
        ended: Counter = Counter()
        for counts in self.outcomes.values():
            ended.update(counts)
        return self._totals(sum(self.sent.values()), ended)

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": self.totals(),
            "by_mode": {
                mode: {"sent": self.sent[mode], **dict(self.outcomes.get(mode, {}))}
                for mode in sorted(self.sent)
            },
            "by_target": {
                target: {
                    **self._totals(self.target_sent[target], self.target_outcomes.get(target, Counter())),
                    "codes": dict(sorted(self.target_codes.get(target, Counter()).items())),
                }
                for target in sorted(self.target_sent)
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Ledger":
        """The inverse of `to_dict` (what a Locust worker wrote)."""
        ledger = cls()
        for mode, counts in (data.get("by_mode") or {}).items():
            ledger.sent[mode] += int(counts.get("sent", 0))
            ledger.outcomes[mode] = Counter({k: int(counts[k]) for k in OUTCOME_KEYS if counts.get(k)})
        for target, counts in (data.get("by_target") or {}).items():
            ledger.target_sent[target] += int(counts.get("sent", 0))
            ledger.target_outcomes[target] = Counter({k: int(counts[k]) for k in OUTCOME_KEYS if counts.get(k)})
            ledger.target_codes[target] = Counter({k: int(v) for k, v in (counts.get("codes") or {}).items()})
        return ledger

    @classmethod
    def merge(cls, ledgers: list["Ledger"]) -> "Ledger":
        merged = cls()
        for ledger in ledgers:
            merged.sent.update(ledger.sent)
            merged.target_sent.update(ledger.target_sent)
            for mine, theirs in ((merged.outcomes, ledger.outcomes), (merged.target_outcomes, ledger.target_outcomes),
                                 (merged.target_codes, ledger.target_codes)):
                for key, counts in theirs.items():
                    mine.setdefault(key, Counter()).update(counts)
        return merged

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
