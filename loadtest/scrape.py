"""Periodic samples of TorchServe's own view during a load run: its Prometheus metrics endpoint
and the management API's model description (worker states, job queue depth).

Why both: the Prometheus text has the frontend's counters and gauges (QueueTime, Requests5XX,
CPU, memory) and the handler's morph metrics (MorphLatencySeconds, MorphRequests, ...), but no
queue depth; `GET /models/<name>` reports `jobQueueStatus.pendingRequests` and each worker's
status, which is what "is the queue full / did a worker die" needs. One JSON line per sample and
replica, named by the replica's `target`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
IGNORED_LABELS = frozenset({"Hostname", "hostname", "Level", "ModelName", "model_name", "model_version"})


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format -> {"Name{label=value,...}": value}; host/model labels dropped
    (one host, one model), so keys are stable across runs."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = [
            f"{key}={value}" for key, value in _LABEL.findall(match.group("labels") or "")
            if key not in IGNORED_LABELS
        ]  # fmt: skip
        key = match.group("name") + (f"{{{','.join(sorted(labels))}}}" if labels else "")
        try:
            samples[key] = float(match.group("value"))
        except ValueError:
            continue
    return samples


def _get(url: str, headers: dict[str, str], timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


@dataclass(frozen=True)
class ScrapeSource:
    """One replica to sample: its metrics and model-description URLs and its management token
    (called for each sample: keys rotate)."""

    target: str  # the replica's name in the run (its gRPC address)
    metrics_url: str
    describe_url: str
    management_token: Callable[[], str | None] = lambda: None


@dataclass
class Scraper:
    """Samples every source every `interval_s` seconds on one thread, appending one JSON line
    per source and round to `out` (one writer, so lines never interleave)."""

    sources: list[ScrapeSource]
    out: Path
    interval_s: float = 2.0
    timeout_s: float = 5.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self, source: ScrapeSource) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": round(time.time(), 3), "target": source.target}
        try:
            record["metrics"] = parse_prometheus(_get(source.metrics_url, {}, self.timeout_s).decode())
        except (OSError, urllib.error.URLError, ValueError) as error:
            record["metrics_error"] = f"{type(error).__name__}: {error}"
        try:
            token = source.management_token()
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            model = json.loads(_get(source.describe_url, headers, self.timeout_s))[0]
            queue = model.get("jobQueueStatus") or {}
            record["queue"] = {
                "pending": queue.get("pendingRequests"),
                "remaining": queue.get("remainingCapacity"),
            }
            record["workers"] = [w.get("status") for w in model.get("workers", [])]
            record["min_workers"] = model.get("minWorkers")
            record["max_workers"] = model.get("maxWorkers")
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError) as error:
            record["describe_error"] = f"{type(error).__name__}: {error}"
        return record

    def _loop(self) -> None:
        with self.out.open("a") as sink:
            while True:
                for source in self.sources:
                    sink.write(json.dumps(self.sample(source)) + "\n")
                sink.flush()
                if self._stop.wait(self.interval_s):
                    return

    def start(self) -> "Scraper":
        self._thread = threading.Thread(target=self._loop, name="torchserve-scraper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 3 * max(1, len(self.sources)))


def read_samples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
