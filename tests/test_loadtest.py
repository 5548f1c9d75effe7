"""Capacity test harness: a short headless Locust run against a real TorchServe, and the pieces
it is built from.

The end-to-end run (`python -m loadtest.run`, what `make loadtest` runs) uses the tiny profile
with a deliberately small queue (jobQueueSize 2, one worker): 2 users (gRPC + REST) fit, 6 users
do not, so the same ~30 s of load checks both normal service and what happens past capacity:
fast "busy" answers, every sent request answered, no unexpected failure.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.outcomes import BUSY_MESSAGE, Backoff, Ledger, Outcome, classify_grpc, classify_http
from loadtest.profiles import load_profiles
from loadtest.report import WHOLE_RUN_COLUMNS, percentile
from loadtest.scrape import parse_prometheus
from loadtest.schedule import StepSchedule
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT

STAGES = "2,6"
STAGE_S = 15  # 2 x 15 s of load, then in-flight morphs drain (a few seconds each)
QUEUE = 2
LOCUST_LIMIT_S = 60  # the acceptance bound for the Locust part
BUSY_FAST_MS = 3000  # a refusal must come back faster than any morph (>= 3 s here; measured <= 0.2 s)


# ---------------------------------------------------------------------------- units (fast)
def test_step_schedule_steps_users_and_stops_at_the_hard_limit() -> None:
    schedule = StepSchedule.parse("1,2,4", stage_s=10, max_s=25)
    assert [schedule.users_at(t) for t in (0, 9.9, 10, 20, 24.9)] == [1, 1, 2, 4, 4]
    assert schedule.users_at(25) is None
    assert schedule.windows() == [(1, 0, 10), (2, 10, 20), (4, 20, 25)]
    with pytest.raises(ValueError):
        StepSchedule.parse("0,2", 10, 100)


def test_busy_is_told_apart_from_real_failures() -> None:
    busy = f'Model "diffmorpher" {BUSY_MESSAGE}. Please use scale workers API to add workers.'
    assert classify_grpc("INTERNAL", busy) is Outcome.BUSY
    assert classify_grpc("INTERNAL", "morph failed: RuntimeError") is Outcome.ERROR
    assert classify_grpc("DEADLINE_EXCEEDED", "") is Outcome.LOST
    assert classify_grpc("INVALID_ARGUMENT", "bad") is Outcome.ERROR
    assert [classify_http(code) for code in (200, 503, 500, None)] == [
        Outcome.OK, Outcome.BUSY, Outcome.ERROR, Outcome.LOST,
    ]


def test_ledger_counts_unanswered_requests() -> None:
    ledger = Ledger()
    for mode, outcome in (("unary", Outcome.OK), ("stream", Outcome.BUSY), ("predictions", Outcome.LOST)):
        ledger.send(mode)
        ledger.settle(mode, outcome)
    ledger.send("unary")  # never settled: a user killed mid-request
    totals = ledger.totals()
    assert (totals["sent"], totals["answered"], totals["lost"], totals["unaccounted"]) == (4, 2, 1, 1)


def test_refused_users_back_off_exponentially_and_reset_on_an_answer() -> None:
    backoff = Backoff(think_s=0.0, base_s=1.0, max_s=8.0, rng=random.Random(0))
    waits = []
    for _ in range(6):
        backoff.answered(Outcome.BUSY)
        waits.append(backoff.next_wait())
    for wait, nominal in zip(waits, (1, 2, 4, 8, 8, 8)):
        assert 0.5 * nominal <= wait <= 1.5 * nominal
    backoff.answered(Outcome.OK)
    assert backoff.next_wait() == 0.0


def test_prometheus_text_is_parsed_without_host_labels() -> None:
    text = (
        "# HELP x\n"
        'MorphRequests{Mode="unary",ModelName="diffmorpher",Level="Model",Hostname="vm",} 5.0\n'
        'QueueTime{Level="Host",Hostname="vm",} 6103.0\n'
    )
    assert parse_prometheus(text) == {"MorphRequests{Mode=unary}": 5.0, "QueueTime": 6103.0}


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(0).shuffle(values)
    assert (percentile(values, 50), percentile(values, 95), percentile([], 50)) == (50.0, 95.0, None)


def test_profiles_use_morph_config_option_names() -> None:
    sys.path.insert(0, str(REPO_ROOT / "handler"))
    from loadtest.profiles import check_options

    profiles = load_profiles()
    assert {"tiny", "default", "heavy"} <= set(profiles)
    assert len(profiles["heavy"].images) > 2
    for profile in profiles.values():
        check_options(profile)
        images, prompts = profile.inputs()
        assert len(images) == len(prompts) == len(profile.images)


# ---------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """One `python -m loadtest.run` against a TorchServe it starts on free loopback ports."""
    out = tmp_path_factory.mktemp("loadtest") / "results"
    model = EMBEDDED_MODEL if (EMBEDDED_MODEL / "unet").is_dir() else request.getfixturevalue("tiny_sd_dir")
    command = [
        sys.executable, "-m", "loadtest.run", "--profile", "tiny", "--stages", STAGES,
        "--stage-seconds", str(STAGE_S), "--max-seconds", str(LOCUST_LIMIT_S - 15),
        "--job-queue-size", str(QUEUE), "--workers", "1", "--worker-threads", "1",
        "--scrape-interval", "1", "--model", str(model), "--out", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
    return out, process, time.monotonic() - started


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def report_table(report: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after `heading`."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_load_run_succeeds_and_stays_bounded(load_run) -> None:
    out, process, elapsed = load_run
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["stopped_wall"] - ledger["started_wall"] <= LOCUST_LIMIT_S
    print(f"load run: {elapsed:.0f} s in all, Locust {ledger['stopped_wall'] - ledger['started_wall']:.0f} s")


@pytest.mark.slow
def test_grpc_and_rest_were_used_and_every_request_answered(load_run) -> None:
    out, _, _ = load_run
    ledger = json.loads((out / "ledger.json").read_text())
    totals, by_mode = ledger["totals"], ledger["by_mode"]
    assert by_mode["predictions"]["ok"] > 0
    assert by_mode.get("unary", {}).get("ok", 0) + by_mode.get("stream", {}).get("ok", 0) > 0
    assert by_mode["unary"]["sent"] > 0 and by_mode["stream"]["sent"] > 0  # both gRPC calls tried
    assert totals["sent"] == totals["answered"] > 0
    assert totals["error"] == totals["lost"] == totals["unaccounted"] == 0
    # Locust's own counts of the request series add up to the ledger.
    stats = read_csv(out / "locust_stats.csv")
    primary = [r for r in stats if r["Type"] in ("gRPC", "REST") and r["Name"].endswith((" morph", " busy"))]
    assert sum(int(r["Request Count"]) for r in primary) == totals["sent"]
    assert sum(int(r["Failure Count"]) for r in primary if r["Name"].endswith(" morph")) == 0


@pytest.mark.slow
def test_past_capacity_requests_get_a_fast_busy_answer(load_run) -> None:
    out, _, _ = load_run
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["totals"]["busy"] > 0, "6 users on 1 worker + a queue of 2 must be refused some"
    stats = read_csv(out / "locust_stats.csv")
    busy = [r for r in stats if r["Name"].endswith(" busy")]
    assert busy and all(float(r["95%"]) <= BUSY_FAST_MS for r in busy), busy
    morphs = [r for r in stats if r["Name"].endswith(" morph") and r["Type"] in ("gRPC", "REST")]
    deadline_ms = ledger["profile"]["deadline_s"] * 1000
    assert all(float(r["Max Response Time"]) < deadline_ms for r in morphs)
    failures = read_csv(out / "locust_failures.csv")
    assert all(r["Name"].endswith(" busy") for r in failures), failures
    assert sum(int(r["Occurrences"]) for r in failures) == ledger["totals"]["busy"]


@pytest.mark.slow
def test_report_files_exist_and_match_the_csv(load_run) -> None:
    out, _, _ = load_run
    for name in ("report.md", "report.png", "summary.json", "locust_stats_history.csv", "torchserve_metrics.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consistency_problems"] == []
    # Whole-run table == locust_stats.csv, entry by entry.
    rows = {(r[0], r[1]): r[2:] for r in report_table(report, "## Whole run")}
    stats = [r for r in read_csv(out / "locust_stats.csv") if r["Name"] != "Aggregated"]
    assert len(rows) == len(stats)
    for row in stats:
        cells = rows[(row["Type"], row["Name"])]
        for column, cell in zip(WHOLE_RUN_COLUMNS, cells):
            assert float(cell) == pytest.approx(float(row[column]), abs=0.051), (row["Name"], column)
    # Per-stage table adds up to the ledger; the headline numbers are the ledger's.
    totals = summary["ledger"]
    stages = report_table(report, "## Per stage")
    assert [int(r[0]) for r in stages] == [int(u) for u in STAGES.split(",")]
    assert sum(int(r[1]) for r in stages) == totals["sent"]
    assert sum(int(r[2]) for r in stages) == totals["ok"]
    assert sum(int(r[3]) for r in stages) == totals["busy"]
    assert f"**{totals['sent']} requests sent, {totals['answered']} answered**" in report
    # The capacity recommendation is stated with numbers.
    capacity = summary["capacity"]
    assert f"minWorkers = {capacity['min_workers']}" in report
    assert f"job_queue_size = {capacity['job_queue_size']}" in report
    assert capacity["per_worker_per_min"] is None or capacity["per_worker_per_min"] > 0
