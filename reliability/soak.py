"""Soak: mixed good and hostile requests for a fixed time; worker memory and file descriptors
sampled throughout, with their trend.

    python -m reliability.soak --minutes 30                 # own server (`make soak`)
    python -m reliability.soak --minutes 2 --token-minutes 1  # short, with 1-minute tokens

A leak shows as a trend, not as a level: after a warm-up (the first `warmup_fraction` of the
run, while allocators and caches fill), the least-squares slope of each process's RSS (MiB per
hour) and open file descriptors (per hour) is reported, with the growth over the second half.
Requests cycle through quick good morphs on every transport and every corpus case; each answer
is judged against the case's expectation, so the soak also proves the service keeps answering
correctly (and, with short-lived tokens, across token rotations). Standard library + grpcio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from launcher.archive import export_model
from launcher.torchserve import TorchServeProcess

from .corpus import OK, Case, build_corpus, request
from .send import Endpoints, Sender, judge

QUICK = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    t: float  # seconds since the soak started
    process: str  # "worker", "frontend" or "guard"
    pid: int
    rss_mib: float
    fds: int


@dataclass
class SoakReport:
    duration_s: float
    requests: int = 0
    good: int = 0
    good_ok: int = 0
    mismatches: list[str] = field(default_factory=list)
    token_retries: int = 0
    worker_pids: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    trends: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "samples": [asdict(s) for s in self.samples]}


def usage(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open file descriptors) of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def trends(samples: list[Sample], duration_s: float, warmup_fraction: float) -> dict[str, dict[str, float]]:
    """Per process kind, after the warm-up: RSS and fd slopes, and growth over the second half."""
    result = {}
    for process in sorted({s.process for s in samples}):
        steady = [s for s in samples if s.process == process and s.t >= warmup_fraction * duration_s]
        if len(steady) < 2:
            continue
        second_half = [s for s in steady if s.t >= duration_s / 2] or steady[-2:]
        result[process] = {
            "rss_mib_per_hour": round(slope_per_hour([(s.t, s.rss_mib) for s in steady]), 2),
            "fds_per_hour": round(slope_per_hour([(s.t, s.fds) for s in steady]), 2),
            "rss_mib_first": round(steady[0].rss_mib, 1),
            "rss_mib_last": round(steady[-1].rss_mib, 1),
            "rss_growth_second_half_mib": round(second_half[-1].rss_mib - second_half[0].rss_mib, 1),
            "fds_first": steady[0].fds,
            "fds_last": steady[-1].fds,
            "samples": len(steady),
        }
    return result


def schedule(cases: list[Case]) -> itertools.cycle:
    """Good morphs on each transport in turn, each followed by two corpus cases."""
    good = [Case(f"good_{t}", request(options=QUICK), OK, transports=(t,)) for t in ("unary", "stream", "rest")]
    plan = []
    bad = [(case, transport) for case in cases for transport in case.transports]
    for index, (case, transport) in enumerate(bad):
        if index % 2 == 0:
            plan.append((good[(index // 2) % 3], good[(index // 2) % 3].transports[0]))
        plan.append((case, transport))
    return itertools.cycle(plan)


def run_soak(
    endpoints: Endpoints,
    pids: Callable[[], dict[str, list[int]]],
    duration_s: float,
    *,
    sample_every_s: float = 5.0,
    warmup_fraction: float = 0.2,
    log: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Send the schedule until `duration_s` has passed, sampling `pids()` (process kind -> pids)."""
    report = SoakReport(duration_s)
    sender = Sender(endpoints)
    plan = schedule(build_corpus(QUICK))
    started = time.monotonic()
    next_sample = 0.0
    seen_workers: set[int] = set()
    try:
        while (elapsed := time.monotonic() - started) < duration_s:
            if elapsed >= next_sample:
                for process, process_pids in pids().items():
                    for pid in process_pids:
                        measured = usage(pid)
                        if measured is not None:
                            report.samples.append(Sample(round(elapsed, 2), process, pid, *measured))
                        if process == "worker":
                            seen_workers.add(pid)
                next_sample = elapsed + sample_every_s
            case, transport = next(plan)
            answer = sender.send(case, transport, timeout_s=120)
            report.requests += 1
            report.token_retries += answer.token_retries
            if case.name.startswith("good_"):
                report.good += 1
                report.good_ok += answer.code in ("OK", "200")
            problem = judge(case, answer)
            if problem:
                report.mismatches.append(f"{elapsed:.0f}s {case.name}/{transport}: {problem}")
                log(f"MISMATCH {case.name}/{transport}: {problem}")
    finally:
        sender.close()
    report.worker_pids = sorted(seen_workers)
    report.trends = trends(report.samples, duration_s, warmup_fraction)
    return report


def markdown(report: SoakReport) -> str:
    lines = [
        f"# Soak: {report.duration_s / 60:.1f} minutes",
        "",
        f"- requests: {report.requests} (good morphs {report.good_ok}/{report.good} succeeded), "
        f"answers not as expected: {len(report.mismatches)}, token re-reads after a rotation: {report.token_retries}",
        f"- worker pids seen: {report.worker_pids}",
        "",
        "| process | RSS MiB/hour | fds/hour | RSS first -> last (MiB) | growth, 2nd half (MiB) | fds first -> last |",
        "|---|---|---|---|---|---|",
    ]
    for process, t in report.trends.items():
        lines.append(
            f"| {process} | {t['rss_mib_per_hour']} | {t['fds_per_hour']} | {t['rss_mib_first']} -> "
            f"{t['rss_mib_last']} | {t['rss_growth_second_half_mib']} | {t['fds_first']} -> {t['fds_last']} |"
        )
    lines += ["", *[f"- {m}" for m in report.mismatches[:50]]]
    return "\n".join(lines) + "\n"


def write_report(report: SoakReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report.to_json(), indent=1))
    (out / "soak.md").write_text(markdown(report))


def server_pids(server) -> Callable[[], dict[str, list[int]]]:
    """Process kind -> pids of a launcher.torchserve.TorchServeProcess."""

    def pids() -> dict[str, list[int]]:
        result = {"frontend": _java_children(server.process.pid) if server.process else []}
        result["guard"] = [server.guard_process.pid] if server.guard_process else []
        try:
            result["worker"] = server.worker_pids()
        except (OSError, KeyError, ValueError):
            result["worker"] = []
        return result

    return pids


def _java_children(pid: int) -> list[int]:
    """The Java frontend under the `torchserve` launcher process (the launcher itself is idle)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child.pid for child in children if "java" in child.name()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--token-minutes", type=float, default=None,
                        help="token_expiration_min for the soak's server (default: config.properties)")
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny-shapes-sd"))
    parser.add_argument("--out", default=None, help="report folder (default: loadtest/results/soak-<time>)")
    args = parser.parse_args(argv)

    out = Path(args.out or REPO_ROOT / "loadtest" / "results" / time.strftime("soak-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        store = Path(tmp) / "model_store"
        export_model(Path(args.model), store, "--archive-format", "no-archive", quiet=True)
        overrides = {} if args.token_minutes is None else {"token_expiration_min": str(args.token_minutes)}
        with TorchServeProcess(Path(tmp) / "server", store, archive="diffmorpher", overrides=overrides) as server:
            endpoints = Endpoints(server.grpc_target, server.url("inference", ""), server.key_file)
            report = run_soak(endpoints, server_pids(server), args.minutes * 60, log=print)
            status = server.health("/status")[1]
    write_report(report, out)
    print(markdown(report))
    print(f"guard: token rotations {status.get('token_rotations')}, repairs {status.get('repairs')}")
    print(f"report: {out}")
    return 0 if not report.mismatches and report.good_ok == report.good else 1


if __name__ == "__main__":
    raise SystemExit(main())
