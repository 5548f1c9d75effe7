"""Capacity report of one load run: markdown summary, PNG plot and summary.json.

    python -m loadtest.report loadtest/results/<timestamp>

Inputs, all in the results directory (written by loadtest/run.py and the locustfile):
`locust_stats.csv` / `locust_failures.csv` (Locust's CSVs: the whole-run table is copied from
them verbatim), `samples.jsonl` (one line per Locust request event: cut into stages here, since
Locust only keeps whole-run and 10-second rolling percentiles), `ledger.json` (sent vs
answered, stage schedule, profile), `torchserve_metrics.jsonl` (the server's metrics and queue
during the run) and `run.json` (machine and server settings).

Latencies per stage are exact nearest-rank percentiles over that stage's samples; Locust's own
percentiles (whole-run table) are rounded by Locust to two significant digits.

Goodput is successful morphs per minute: per stage, the morphs that ended in the stage's window;
per target (replica) and combined, the morphs that ended within the schedule, over its length.
Both count the same samples, so the combined goodput is the sum of the targets' goodputs, and
the runs's load generators (Locust workers) are listed with what each sent.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.scrape import read_samples

CSV_PREFIX = "locust"
MORPH_TYPES = ("gRPC", "REST")
HANDLER_SERIES = ("handler", "morph time")
TTFF_SERIES = ("gRPC", "stream first frame")
FRAME_SERIES = ("gRPC", "stream frame interval")
WHOLE_RUN_COLUMNS = ("Request Count", "Failure Count", "Median Response Time", "95%", "99%", "Max Response Time")


# ---------------------------------------------------------------------------- inputs
@dataclass
class RunData:
    directory: Path
    stats: list[dict[str, str]]
    failures: list[dict[str, str]]
    samples: list[dict[str, Any]]
    ledger: dict[str, Any]
    scrapes: list[dict[str, Any]]
    run: dict[str, Any]

    @property
    def started(self) -> float:
        return float(self.ledger["started_wall"])

    @property
    def stage_s(self) -> float:
        return float(self.ledger["schedule"]["stage_s"])

    def windows(self) -> list[tuple[int, float, float]]:
        schedule = self.ledger["schedule"]
        duration = min(schedule["stage_s"] * len(schedule["users"]), schedule["max_s"])
        result = []
        for index, users in enumerate(schedule["users"]):
            start = index * schedule["stage_s"]
            if start < duration:
                result.append((users, start, min(start + schedule["stage_s"], duration)))
        return result


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def load(directory: Path) -> RunData:
    return RunData(
        directory=directory,
        stats=read_csv(directory / f"{CSV_PREFIX}_stats.csv"),
        failures=read_csv(directory / f"{CSV_PREFIX}_failures.csv"),
        samples=read_samples(directory / "samples.jsonl"),
        ledger=json.loads((directory / "ledger.json").read_text()),
        scrapes=read_samples(directory / "torchserve_metrics.jsonl"),
        run=json.loads((directory / "run.json").read_text()) if (directory / "run.json").is_file() else {},
    )


# ---------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def is_morph(sample: dict[str, Any]) -> bool:
    return sample["type"] in MORPH_TYPES and sample["name"].endswith(" morph")


def is_busy(sample: dict[str, Any]) -> bool:
    return sample["type"] in MORPH_TYPES and sample["name"].endswith(" busy")


@dataclass
class StageStats:
    users: int
    start_s: float
    end_s: float
    sent: int = 0  # morph + busy + failed requests that ended in the stage (last one: or after)
    ok: int = 0
    sent_in_window: int = 0  # ... that ended before the stage's end (rates use these)
    ok_in_window: int = 0
    busy: int = 0
    failed: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    max_s: float | None = None
    ttff_p50_s: float | None = None
    frame_interval_p50_s: float | None = None
    worker_mean_s: float | None = None
    busy_p95_ms: float | None = None
    offered_per_min: float = 0.0
    goodput_per_min: float = 0.0
    queue_pending_mean: float | None = None
    queue_pending_max: float | None = None
    worker_states: list[str] = field(default_factory=list)
    cpu_mean: float | None = None

    @property
    def minutes(self) -> float:
        return (self.end_s - self.start_s) / 60.0


def stage_index(t: float, windows: list[tuple[int, float, float]]) -> int:
    """Stage an event belongs to; events after the last stage (the drain) go to the last one."""
    for index, (_, start, end) in enumerate(windows):
        if t < end:
            return max(index, 0)
    return len(windows) - 1


def stage_stats(data: RunData) -> list[StageStats]:
    windows = data.windows()
    stages = [StageStats(users, start, end) for users, start, end in windows]
    latencies: list[list[float]] = [[] for _ in stages]
    extras: dict[str, list[list[float]]] = {k: [[] for _ in stages] for k in ("ttff", "frame", "worker", "busy")}
    for sample in data.samples:
        t = sample["ts"] - data.started
        index = stage_index(t, windows)
        stage = stages[index]
        in_window = t < stage.end_s
        key = (sample["type"], sample["name"])
        if is_morph(sample) or is_busy(sample):
            stage.sent += 1
            stage.sent_in_window += in_window
            if sample["error"] is None and is_morph(sample):
                stage.ok += 1
                stage.ok_in_window += in_window
                latencies[index].append(sample["ms"] / 1000.0)
            elif is_busy(sample):
                stage.busy += 1
                extras["busy"][index].append(sample["ms"])
            else:
                stage.failed += 1
        elif key == TTFF_SERIES:
            extras["ttff"][index].append(sample["ms"] / 1000.0)
        elif key == FRAME_SERIES:
            extras["frame"][index].append(sample["ms"] / 1000.0)
        elif key == HANDLER_SERIES:
            extras["worker"][index].append(sample["ms"] / 1000.0)
    for index, stage in enumerate(stages):
        values = latencies[index]
        stage.p50_s, stage.p95_s = percentile(values, 50), percentile(values, 95)
        stage.max_s = max(values) if values else None
        stage.ttff_p50_s = percentile(extras["ttff"][index], 50)
        stage.frame_interval_p50_s = percentile(extras["frame"][index], 50)
        stage.worker_mean_s = statistics.fmean(extras["worker"][index]) if extras["worker"][index] else None
        stage.busy_p95_ms = percentile(extras["busy"][index], 95)
        stage.offered_per_min = stage.sent_in_window / stage.minutes if stage.minutes else 0.0
        stage.goodput_per_min = stage.ok_in_window / stage.minutes if stage.minutes else 0.0
        scrapes = [s for s in data.scrapes if stage.start_s <= s["ts"] - data.started < stage.end_s]
        pending = [s["queue"]["pending"] for s in scrapes if (s.get("queue") or {}).get("pending") is not None]
        if pending:
            stage.queue_pending_mean, stage.queue_pending_max = statistics.fmean(pending), max(pending)
        stage.worker_states = sorted({state for s in scrapes for state in s.get("workers") or []})
        cpu = [s["metrics"]["CPUUtilization"] for s in scrapes if "CPUUtilization" in s.get("metrics", {})]
        stage.cpu_mean = statistics.fmean(cpu) if cpu else None
    return stages


def series_values(data: RunData, key: tuple[str, str]) -> list[float]:
    return [s["ms"] / 1000.0 for s in data.samples if (s["type"], s["name"]) == key and s["error"] is None]


def scrapes_by_target(scrapes: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for scrape in scrapes:
        grouped.setdefault(str(scrape.get("target") or ""), []).append(scrape)
    return grouped


def counter_deltas_of(scrapes: list[dict[str, Any]]) -> dict[str, float]:
    """Change of every counter-like metric between the first and the last scrape of one server."""
    with_metrics = [s["metrics"] for s in scrapes if s.get("metrics")]
    if not with_metrics:
        return {}
    first, last = with_metrics[0], with_metrics[-1]
    names = ("Requests2XX", "Requests4XX", "Requests5XX", "ts_inference_requests_total", "MorphRequests",
             "MorphRejected", "MorphFrames")
    return {
        key: last[key] - first.get(key, 0.0)
        for key in sorted(last)
        if key.split("{")[0] in names
    }


def counter_deltas(scrapes: list[dict[str, Any]]) -> dict[str, float]:
    """Counter changes per server; with several, each key is prefixed with the server's target."""
    grouped = scrapes_by_target(scrapes)
    prefix = len(grouped) > 1
    return {f"{target} {key}" if prefix else key: value
            for target, group in sorted(grouped.items())
            for key, value in counter_deltas_of(group).items()}


def gauge_summary(scrapes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and max of the gauges scraped during the run (each scrape sees the latest value),
    per server as in `counter_deltas`."""
    names = ("QueueTime", "WorkerThreadTime", "MorphLatencySeconds", "CPUUtilization", "MemoryUsed")
    grouped = scrapes_by_target(scrapes)
    values: dict[str, list[float]] = {}
    for target, group in sorted(grouped.items()):
        for scrape in group:
            for key, value in (scrape.get("metrics") or {}).items():
                if key.split("{")[0] in names:
                    values.setdefault(f"{target} {key}" if len(grouped) > 1 else key, []).append(value)
    return {key: {"mean": statistics.fmean(v), "max": max(v)} for key, v in sorted(values.items())}


# ---------------------------------------------------------------------------- targets, workers
@dataclass
class TargetStats:
    """One target (replica), or all of them combined (name "combined")."""

    name: str
    sent: int
    ok: int
    busy: int
    error: int
    lost: int
    codes: dict[str, int]
    goodput_per_min: float  # morphs that ended within the schedule / its minutes
    stage_goodput_per_min: list[float]  # the same per stage (as the per-stage table counts them)
    p50_s: float | None
    p95_s: float | None


def target_stats(data: RunData, stages: list[StageStats]) -> tuple[list[TargetStats], TargetStats]:
    """Per target from the ledger (counts, status codes) and the samples (goodput, latency); the
    combined row from all samples, independently of the per-target rows."""
    windows = data.windows()
    minutes = windows[-1][2] / 60.0 if windows else 0.0
    by_target = data.ledger.get("by_target") or {}
    names = sorted(set(by_target) | {str(s["target"]) for s in data.samples if is_morph(s) and s.get("target")})

    def stats_for(name: str, samples: list[dict[str, Any]], counts: dict[str, Any]) -> TargetStats:
        per_stage = [0] * len(stages)
        latencies = []
        for sample in samples:
            if not is_morph(sample) or sample["error"] is not None:
                continue
            t = sample["ts"] - data.started
            index = stage_index(t, windows)
            latencies.append(sample["ms"] / 1000.0)
            if t < stages[index].end_s:
                per_stage[index] += 1
        return TargetStats(
            name=name, sent=int(counts.get("sent", 0)), ok=int(counts.get("ok", 0)),
            busy=int(counts.get("busy", 0)), error=int(counts.get("error", 0)), lost=int(counts.get("lost", 0)),
            codes=dict(counts.get("codes") or {}),
            goodput_per_min=sum(per_stage) / minutes if minutes else 0.0,
            stage_goodput_per_min=[n / s.minutes if s.minutes else 0.0 for n, s in zip(per_stage, stages)],
            p50_s=percentile(latencies, 50), p95_s=percentile(latencies, 95),
        )  # fmt: skip

    rows = [stats_for(name, [s for s in data.samples if str(s.get("target")) == name], by_target.get(name, {}))
            for name in names]
    codes: dict[str, int] = {}
    for row in rows:
        for code, count in row.codes.items():
            codes[code] = codes.get(code, 0) + count
    combined = stats_for("combined", data.samples, {**data.ledger["totals"], "codes": dict(sorted(codes.items()))})
    return rows, combined


def codes_text(codes: dict[str, int]) -> str:
    return ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())) or "-"


def load_generator_lines(data: RunData) -> list[str]:
    """Who generated the load: Locust's master and workers, what each worker sent."""
    generator = data.ledger.get("load_generator") or {"mode": "single process", "workers": 1}
    targets = data.ledger.get("targets") or []
    drain = data.ledger.get("drain") or {}
    if generator.get("mode") == "distributed":
        head = (f"Locust distributed mode: 1 master (runs the step shape, aggregates the statistics) + "
                f"{generator['workers']} worker(s) (run the users), users spread round-robin over "
                f"{len(targets)} target(s).")
        if drain.get("seconds") is not None:
            head += (f" After the schedule the workers finished their requests in flight within "
                     f"{drain['seconds']:g} s" + (" (**timed out**)." if drain.get("timed_out") else "."))
    else:
        head = f"One Locust process, {len(targets) or '?'} target(s)."
    lines = [head]
    if data.ledger.get("aborted"):
        lines += ["", f"**The run was stopped early: {data.ledger['aborted']}**"]
    workers = data.ledger.get("workers") or []
    if workers:
        lines += [""] + table(
            ["worker", "sent", "morphs", "busy", "errors", "lost", "unaccounted", "sent per target", "loop lag max ms"],
            [[w["index"], w["totals"]["sent"], w["totals"]["ok"], w["totals"]["busy"], w["totals"]["error"],
              w["totals"]["lost"], w["totals"]["unaccounted"],
              ", ".join(f"{t}: {c['sent']}" for t, c in sorted((w.get("by_target") or {}).items())) or "-",
              fmt(((w.get("client_loop_lag") or {}).get("max_s") or 0) * 1000, 0)]
             for w in workers],
        )
    return lines


def target_lines(rows: list[TargetStats], combined: TargetStats, stages: list[StageStats]) -> list[str]:
    lines = table(
        ["target", "sent", "morphs", "busy", "errors", "lost", "status codes", "goodput/min", "p50 s", "p95 s"],
        [[r.name if r is not combined else "**combined**", r.sent, r.ok, r.busy, r.error, r.lost, codes_text(r.codes),
          fmt(r.goodput_per_min, 2), fmt(r.p50_s), fmt(r.p95_s)] for r in [*rows, combined]],
    )
    lines += ["", "Goodput per stage (morphs/min):", ""]
    lines += table(
        ["users", *(r.name for r in rows), "combined"],
        [[stage.users, *(fmt(r.stage_goodput_per_min[i], 1) for r in rows), fmt(combined.stage_goodput_per_min[i], 1)]
         for i, stage in enumerate(stages)],
    )
    return lines


# ---------------------------------------------------------------------------- capacity
@dataclass
class Capacity:
    p95_target_s: float
    workers: int
    threads_per_worker: int
    cores: int
    service_mean_s: float | None
    service_p95_s: float | None
    best_stage_users: int | None
    per_worker_per_min: float | None  # measured goodput at p95 <= target, per worker
    theoretical_per_worker_per_min: float | None  # 60 / mean service time
    min_workers: int
    max_workers: int
    job_queue_size: int
    explanation: list[str]


def capacity(data: RunData, stages: list[StageStats], p95_target_s: float) -> Capacity:
    run = data.run
    workers = int(run.get("workers") or 1)
    threads = int(run.get("threads_per_worker") or 1)
    cores = int(run.get("cpu_count") or 1)
    service = series_values(data, HANDLER_SERIES)
    service_mean = statistics.fmean(service) if service else None
    service_p95 = percentile(service, 95)
    fitting = [s for s in stages if s.ok and s.p95_s is not None and s.p95_s <= p95_target_s
               and not s.failed and not s.busy]
    best = max(fitting, key=lambda s: s.goodput_per_min, default=None)
    per_worker = best.goodput_per_min / workers if best else None
    # The ceiling is judged at the same stage as the measured rate: on a shared host the
    # worker's speed drifts between stages.
    ceiling_basis = best.worker_mean_s if best and best.worker_mean_s else service_mean
    theoretical = 60.0 / ceiling_basis if ceiling_basis else None
    # One core per worker (one torch thread each), keeping one core for the Java frontend,
    # response encoding and the OS once the host has more than one.
    host_workers = max(1, (cores - (1 if cores > 1 else 0)) // max(threads, 1))
    recommended = host_workers
    if service_mean and service_p95 is not None:
        queue = max(1, math.floor(recommended * (p95_target_s - service_p95) / service_mean))
    else:
        queue = int(run.get("job_queue_size") or 1)
    explanation = [
        f"Sustainable rate per worker: the highest goodput (successful morphs/min) among the stages "
        f"whose morph p95 stayed <= {p95_target_s:g} s with no refusal and no failure, divided by "
        f"the {workers} worker(s) that served the run"
        + (f" (stage of {best.users} users: {best.goodput_per_min:.1f}/min)." if best else
           ": no stage met the target, so none is quoted."),
        "Cross-check: one worker can at most serve 60 s / mean worker morph time"
        + (f" (in that stage) = 60 / {ceiling_basis:.2f} s = {theoretical:.1f} morphs/min"
           + (f"; measured {per_worker / theoretical:.0%} of it (a stage also counts morphs that "
              f"started in the one before, so short stages can exceed 100%)." if per_worker else ".")
           if theoretical else "."),
        f"minWorkers = maxWorkers = {recommended}: one core per worker at {threads} torch thread(s) "
        f"each, one of the {cores} core(s) left to the frontend and OS; TorchServe starts minWorkers "
        f"at registration and a worker takes tens of seconds to load, so a fixed pool is sized "
        f"for the peak. For a demand of D morphs/min: replicas = ceil(D / ({recommended} x "
        f"per-worker rate)).",
        "job_queue_size = floor(workers x (p95 target - worker p95) / worker mean): a request that "
        "finds Q requests queued waits about Q x mean / workers before its own morph, so beyond "
        "that Q it would miss the target anyway and a fast 'busy' answer is better"
        + (f" = floor({recommended} x ({p95_target_s:g} - {service_p95:.2f}) / {service_mean:.2f})"
           f" = {queue}." if service_mean and service_p95 is not None else "."),
    ]
    return Capacity(
        p95_target_s=p95_target_s, workers=workers, threads_per_worker=threads, cores=cores,
        service_mean_s=service_mean, service_p95_s=service_p95,
        best_stage_users=best.users if best else None, per_worker_per_min=per_worker,
        theoretical_per_worker_per_min=theoretical, min_workers=recommended,
        max_workers=recommended, job_queue_size=queue, explanation=explanation,
    )  # fmt: skip


# ---------------------------------------------------------------------------- rendering
def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def csv_number(text: str) -> str:
    """A Locust CSV number as shown in the report: integers as they are, others to 0.1 ms."""
    value = float(text)
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def whole_run_rows(data: RunData) -> list[list[str]]:
    """Locust's whole-run numbers from locust_stats.csv, per entry. Locust's "Aggregated" row is
    left out: it mixes morphs with instant refusals and auxiliary timings, which is meaningless."""
    return [
        [row["Type"], row["Name"], *(csv_number(row[c]) for c in WHOLE_RUN_COLUMNS)]
        for row in data.stats if row["Name"] != "Aggregated"
    ]  # fmt: skip


def mode_rows(data: RunData, stages: list[StageStats]) -> list[list[str]]:
    """p50/p95 (s) of successful morphs per stage and per mode (series)."""
    windows = data.windows()
    keys = sorted({(s["type"], s["name"]) for s in data.samples if is_morph(s)})
    values: dict[tuple[int, tuple[str, str]], list[float]] = {}
    for sample in data.samples:
        key = (sample["type"], sample["name"])
        if is_morph(sample) and sample["error"] is None:
            index = stage_index(sample["ts"] - data.started, windows)
            values.setdefault((index, key), []).append(sample["ms"] / 1000.0)
    rows = []
    for index, stage in enumerate(stages):
        cells = []
        for key in keys:
            found = values.get((index, key), [])
            cells.append(f"{len(found)} / {fmt(percentile(found, 50))} / {fmt(percentile(found, 95))}")
        rows.append([str(stage.users), *cells])
    return [["users", *(f"{t} {n} (n / p50 / p95 s)" for t, n in keys)], *rows]


def error_rows(data: RunData) -> list[list[str]]:
    rows = []
    for row in data.failures:
        kind = "expected: queue full" if row["Name"].endswith(" busy") else "UNEXPECTED"
        rows.append([row["Method"], row["Name"], kind, row["Error"].replace("|", "/"), row["Occurrences"]])
    return rows


def client_health(ledger: dict[str, Any]) -> str:
    lag = ledger.get("client_loop_lag") or {}
    if lag.get("max_s") is None:
        return "Client event-loop lag was not measured."
    verdict = ("the client kept up" if lag["max_s"] < 1.0 else
               "**the client itself stalled: latencies include client-side delay**")
    return (f"Locust's event loop woke up at most {lag['max_s'] * 1000:.0f} ms late "
            f"(p99 {lag['p99_s'] * 1000:.0f} ms): {verdict}.")


def render(data: RunData, stages: list[StageStats], cap: Capacity, png_name: str,
           targets: tuple[list[TargetStats], TargetStats]) -> str:
    run, ledger, totals = data.run, data.ledger, data.ledger["totals"]
    profile = ledger["profile"]
    machine = run.get("machine", {})
    lines = [
        f"# Capacity report: profile `{profile['name']}`",
        "",
        f"Run {run.get('started_iso', '?')}, {len(stages)} stages of {data.stage_s:g} s "
        f"(users {', '.join(str(s.users) for s in stages)}), Locust {run.get('locust_version', '?')}, "
        f"TorchServe {run.get('torchserve_version', '?')}.",
        "",
        "## Machine and server",
        "",
        f"- Host: {machine.get('cpu_model', '?')}, {run.get('cpu_count', '?')} vCPU, "
        f"{machine.get('memory_gb', '?')} GB RAM, {machine.get('gpu', 'no GPU')}; "
        f"load average at start {machine.get('loadavg', '?')} (other processes share these cores).",
        f"- TorchServe: {run.get('replicas', 1)} replica(s), {run.get('workers', '?')} worker(s) in all, "
        f"{run.get('threads_per_worker', '?')} torch "
        f"thread(s) per worker (OMP_NUM_THREADS), job queue size {run.get('job_queue_size', '?')}, "
        f"batch size 1; server {run.get('server', '?')}.",
        f"- Model: {run.get('model', '?')}.",
        *([f"- Note: {run['note']}"] if run.get("note") else []),
        f"- Profile: {profile.get('description', '')}; options `{json.dumps(profile['options'])}`, "
        f"{len(profile['images'])} images, {profile['stream_share']:.0%} of gRPC requests streamed, "
        f"deadline {profile['deadline_s']:g} s. Users: 2 gRPC (unary + stream) : 1 REST, closed loop "
        f"(think time {run.get('think_seconds', 0):g} s), exponential backoff after a busy answer.",
        "",
        "## Sent vs answered",
        "",
        f"**{totals['sent']} requests sent, {totals['answered']} answered** "
        f"({totals['ok']} morphs, {totals['busy']} refused as busy, {totals['error']} other errors), "
        f"{totals['lost']} lost (deadline or connection), {totals['unaccounted']} unaccounted. "
        + ("Every sent request was answered." if totals["sent"] == totals["answered"] else
           "**Not every request was answered.**"),
        "",
        client_health(ledger),
        "",
        "## Load generator",
        "",
        *load_generator_lines(data),
        "",
        "## Per target (replica)",
        "",
        "Goodput = successful morphs per minute that ended within the schedule "
        f"({data.windows()[-1][2] if data.windows() else 0:g} s; morphs answered in the drain after it are "
        "counted, not rated); combined is computed from all samples and equals the sum of the targets'. "
        "Status codes as the load generator saw them (gRPC code, HTTP status).",
        "",
        *target_lines(*targets, stages),
        "",
        "## Per stage (concurrency = users)",
        "",
        "Latencies are those of successful morphs (all modes); refusals are counted separately. "
        "Offered = requests that ended in the stage per minute (morphs + refusals + failures); "
        "goodput = successful morphs per minute.",
        "",
    ]
    lines += table(
        ["users", "sent", "morphs", "busy", "failed", "offered/min", "goodput/min", "p50 s", "p95 s",
         "max s", "TTFF p50 s", "frame gap p50 s", "worker morph s", "busy p95 ms", "queue mean/max" + (" per replica" if run.get("replicas", 1) > 1 else ""),
         "CPU %"],
        [[s.users, s.sent, s.ok, s.busy, s.failed, fmt(s.offered_per_min, 1), fmt(s.goodput_per_min, 1),
          fmt(s.p50_s), fmt(s.p95_s), fmt(s.max_s), fmt(s.ttff_p50_s), fmt(s.frame_interval_p50_s, 3),
          fmt(s.worker_mean_s), fmt(s.busy_p95_ms, 0),
          f"{fmt(s.queue_pending_mean, 1)}/{fmt(s.queue_pending_max, 0)}", fmt(s.cpu_mean, 0)]
         for s in stages],
    )
    header, *rows = mode_rows(data, stages)
    lines += ["", "By mode:", ""] + table(header, rows)
    lines += ["", f"![latency and throughput vs concurrency]({png_name})", "",
              "## Whole run (Locust, from locust_stats.csv)", "",
              "Response times in ms (Locust rounds its percentiles to two significant digits; its "
              "Aggregated row is left out because it mixes morphs, refusals and auxiliary timings). "
              "`handler / morph time` is the worker's own time per morph from the result's metadata; "
              "`stream first frame` is the time to the first streamed frame.", ""]
    lines += table(["type", "name", "requests", "failures", "median", "p95", "p99", "max"], whole_run_rows(data))
    lines += ["", "## Errors by type (locust_failures.csv)", ""]
    errors = error_rows(data)
    lines += table(["type", "name", "kind", "error", "count"], errors) if errors else ["No errors."]
    lines += ["", "## TorchServe during the run (scraped every "
              f"{run.get('scrape_interval_s', '?')} s)", ""]
    deltas = counter_deltas(data.scrapes)
    lines += table(["counter", "change during run"], [[k, f"{v:g}"] for k, v in deltas.items()]) \
        if deltas else ["No metrics scraped."]
    gauges = gauge_summary(data.scrapes)
    if gauges:
        lines += [""]
        lines += table(["gauge (latest value per scrape)", "mean", "max"],
                       [[k, f"{v['mean']:.2f}", f"{v['max']:.2f}"] for k, v in gauges.items()])
    lines += ["", "TorchServe 0.12 only updates `ts_inference_latency_microseconds` / "
              "`ts_queue_latency_microseconds` for REST; gRPC latency comes from the client timings above "
              "and the handler's `MorphLatencySeconds` / the `handler` series. The queue depth is "
              "`jobQueueStatus.pendingRequests` of the management API.", "",
              "## Capacity recommendation", ""]
    rate = fmt(cap.per_worker_per_min, 1)
    lines += [
        f"- **Sustainable rate: {rate} morphs/min per worker at p95 <= {cap.p95_target_s:g} s** "
        f"(profile `{profile['name']}`; ceiling {fmt(cap.theoretical_per_worker_per_min, 1)}/min from the "
        f"worker's morph time in that stage; over the run the worker took {fmt(cap.service_mean_s)} s "
        f"per morph on average, p95 {fmt(cap.service_p95_s)} s).",
        f"- **Suggested model config for this host: minWorkers = {cap.min_workers}, maxWorkers = "
        f"{cap.max_workers}, job_queue_size = {cap.job_queue_size}.**",
        "",
        "How these were computed:",
        "",
    ]
    lines += [f"{i}. {text}" for i, text in enumerate(cap.explanation, 1)]
    return "\n".join(lines) + "\n"


def plot(data: RunData, stages: list[StageStats], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s.users for s in stages]
    figure, (latency, throughput, timeline) = plt.subplots(1, 3, figsize=(16, 4.8))
    for attr, label, style in (("p50_s", "p50", "o-"), ("p95_s", "p95", "s-"), ("ttff_p50_s", "TTFF p50", "^--")):
        points = [(u, getattr(s, attr)) for u, s in zip(users, stages) if getattr(s, attr) is not None]
        if points:
            latency.plot(*zip(*points), style, label=label)
    latency.set(title="morph latency vs concurrency", xlabel="concurrent users", ylabel="seconds")
    throughput.plot(users, [s.goodput_per_min for s in stages], "o-", label="goodput (morphs/min)")
    throughput.plot(users, [s.offered_per_min for s in stages], "s--", label="offered (requests/min)")
    throughput.bar(users, [s.busy / s.minutes if s.minutes else 0 for s in stages], width=[0.2 * u for u in users],
                   alpha=0.4, color="tab:red", label="busy refusals/min")
    throughput.set(title="throughput vs concurrency", xlabel="concurrent users", ylabel="per minute")
    for axis in (latency, throughput):
        axis.set_xscale("log", base=2)
        axis.set_xticks(users, [str(u) for u in users])
        axis.grid(alpha=0.3)
        axis.legend()
    for name, scrapes in sorted(scrapes_by_target(data.scrapes).items()):
        queued = [s for s in scrapes if (s.get("queue") or {}).get("pending") is not None]
        timeline.step([s["ts"] - data.started for s in queued], [s["queue"]["pending"] for s in queued],
                      where="post", label=f"queued requests {name}".strip())
    timeline.step([w[1] for w in data.windows()] + [data.windows()[-1][2]],
                  users + [users[-1]], where="post", label="users", linestyle="--")
    timeline.set(title="TorchServe queue during the run", xlabel="seconds since start", ylabel="count")
    timeline.grid(alpha=0.3)
    timeline.legend()
    figure.suptitle(f"profile {data.ledger['profile']['name']}: {data.run.get('replicas', 1)} replica(s), "
                    f"{data.run.get('workers', '?')} worker(s) in all, "
                    f"queue {data.run.get('job_queue_size', '?')}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def consistency(data: RunData) -> list[str]:
    """Problems between the sources (empty when the samples add up to Locust's CSV)."""
    problems = []
    counts: dict[tuple[str, str], int] = {}
    for sample in data.samples:
        key = (sample["type"], sample["name"])
        counts[key] = counts.get(key, 0) + 1
    for row in data.stats:
        if row["Name"] == "Aggregated":
            continue
        key = (row["Type"], row["Name"])
        if int(row["Request Count"]) != counts.get(key, 0):
            problems.append(f"{key}: CSV {row['Request Count']} requests, samples {counts.get(key, 0)}")
    return problems


def write_report(directory: Path, p95_target_s: float | None = None) -> dict[str, Any]:
    """Write report.md, report.png and summary.json into `directory`; return the summary."""
    data = load(directory)
    stages = stage_stats(data)
    target = p95_target_s if p95_target_s is not None else float(data.ledger["profile"]["p95_target_s"])
    cap = capacity(data, stages, target)
    targets = target_stats(data, stages)
    plot(data, stages, directory / "report.png")
    text = render(data, stages, cap, "report.png", targets)
    problems = consistency(data)
    if problems:
        text += "\n## Consistency warnings\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    (directory / "report.md").write_text(text)
    summary = {
        "ledger": data.ledger["totals"],
        "stages": [asdict(s) for s in stages],
        "capacity": asdict(cap),
        "targets": [asdict(row) for row in targets[0]],
        "combined": asdict(targets[1]),
        "load_generator": data.ledger.get("load_generator"),
        "workers": data.ledger.get("workers") or [],
        "aborted": data.ledger.get("aborted") or "",
        "whole_run": [dict(zip(["type", "name", *WHOLE_RUN_COLUMNS], row)) for row in whole_run_rows(data)],
        "consistency_problems": problems,
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a loadtest/results/<timestamp> directory")
    parser.add_argument("--p95-target", type=float, help="seconds (default: the profile's)")
    parser.add_argument("--note", help="replace the run's note (stored in run.json)")
    args = parser.parse_args(argv)
    if args.note is not None:
        run_file = args.results / "run.json"
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        run_file.write_text(json.dumps({**run, "note": args.note}, indent=2) + "\n")
    summary = write_report(args.results, args.p95_target)
    print(f"wrote {args.results / 'report.md'}; capacity: {summary['capacity']['per_worker_per_min']} /min/worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
