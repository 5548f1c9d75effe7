"""Capacity test harness: a short headless distributed Locust run against two real TorchServe
replicas, and the pieces it is built from.

The end-to-end run (`python -m loadtest.run`, what `make loadtest` runs) is Locust's distributed
mode, 1 master + 2 workers, against 2 replicas the runner starts, with the tiny profile and a
deliberately small queue (jobQueueSize 2, one worker each): 2 users fit, 10 users (5 per
replica) do not, so the same ~30 s of load checks normal service, what happens past capacity
(fast "busy" answers, every sent request answered, no unexpected failure), that both workers
sent and both replicas served, and that the combined goodput is the sum of the replicas'.
A second, shorter run with an option the server does not know checks that the run stops at
the first refusal with the server's message.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morph_protocol.errors import ErrorCode
from loadtest.outcomes import BUSY_MESSAGE, Backoff, Ledger, Outcome, classify_grpc, classify_http, refused_for_good
from loadtest.profiles import load_profiles
from loadtest.report import WHOLE_RUN_COLUMNS, counter_deltas_of, percentile
from loadtest.run import main as run_main
from loadtest.scrape import parse_prometheus, read_samples
from loadtest.schedule import StepSchedule
from loadtest.targets import TargetError, build_targets, split_list, target_index
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT
from tests.markdown import markdown_table

STAGES = "2,10"
STAGE_S = 15  # 2 x 15 s of load, then in-flight morphs drain (a few seconds each)
QUEUE = 2
WORKERS = 2  # Locust workers
REPLICAS = 2
LOCUST_LIMIT_S = 75  # the bound for the Locust part: 30 s of stages, the drain, start and exit
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
    assert classify_grpc("UNAVAILABLE", "server busy", ErrorCode.BUSY) is Outcome.BUSY  # the gateway's code
    assert classify_grpc("UNAVAILABLE", f"not reachable: {BUSY_MESSAGE}", ErrorCode.UNREACHABLE) is Outcome.LOST
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
    """The committed profiles are valid requests: checked here against the core's own
    MorphConfig (the test may import the core; the load generator does not)."""
    from diffmorpher.config import MorphConfig, OutputOptions

    profiles = load_profiles()
    assert {"tiny", "default", "heavy"} <= set(profiles)
    assert len(profiles["heavy"].images) > 2
    for profile in profiles.values():
        options = dict(profile.options)
        output = {key: options.pop(key) for key in ("format", "frame_duration_ms", "loop") if key in options}
        formats = output.pop("format", "gif")
        MorphConfig.from_dict(options, seed=0)
        for fmt in [formats] if isinstance(formats, str) else list(formats):
            OutputOptions(format=fmt, **output)
        images, prompts = profile.inputs()
        assert len(images) == len(prompts) == len(profile.images)


def test_the_load_generator_imports_nothing_of_the_core() -> None:
    """A fresh interpreter of the project's venv (where the core is importable) imports every
    load-test module the way Locust does (locust first) and plans a run: no torch, no core."""
    code = (
        "import json, sys\n"
        "import locust\n"
        "import loadtest.locustfile, loadtest.run, loadtest.report, loadtest.merge, loadtest.profiles\n"
        "from loadtest.run import build_parser, plan\n"
        "planned = plan(build_parser().parse_args(['--profile', 'tiny']))\n"
        "print(json.dumps({'profile': planned.profile.name, 'core': sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] in ('torch', 'diffmorpher', 'diffusers', 'transformers'))}))\n"
    )
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result == {"profile": "tiny", "core": []}


def test_users_spread_evenly_over_targets_and_workers() -> None:
    # Locust hands a stage's users out to its workers in turn: 10 users, 2 workers = 5 each.
    counts = {(w, t): 0 for w in range(2) for t in range(2)}
    for worker in range(2):
        for user in range(5):
            counts[(worker, target_index(user, worker, 2))] += 1
    assert counts == {(0, 0): 3, (0, 1): 2, (1, 0): 2, (1, 1): 3}  # 5 users per replica, both workers on both
    assert [target_index(u, 0, 3) for u in range(6)] == [0, 1, 2, 0, 1, 2]
    assert target_index(0, -1, 2) == 0  # a worker without an index (old master) counts as 0


def test_target_lists_are_parsed_and_checked() -> None:
    assert split_list(["127.0.0.1:1,127.0.0.1:2", " 127.0.0.1:3 "]) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    targets = build_targets(["127.0.0.1:1", "127.0.0.1:2"], ["http://127.0.0.1:8", "http://127.0.0.1:9"], ["k.json"])
    assert [(t.name, t.rest_url, t.key_file) for t in targets] == [
        ("127.0.0.1:1", "http://127.0.0.1:8", "k.json"), ("127.0.0.1:2", "http://127.0.0.1:9", "k.json"),
    ]
    with pytest.raises(TargetError, match="2 gRPC targets but 1 REST URLs"):
        build_targets(["127.0.0.1:1", "127.0.0.1:2"], ["http://127.0.0.1:8"], [])
    with pytest.raises(TargetError, match="loopback"):
        build_targets(["10.0.0.1:7070"], ["http://127.0.0.1:8"], [])
    with pytest.raises(TargetError, match="listed twice"):
        build_targets(["127.0.0.1:1", "127.0.0.1:1"], ["http://127.0.0.1:8", "http://127.0.0.1:9"], [])


def test_run_refuses_unusable_arguments_before_starting_anything(capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--target", "127.0.0.1:7070", "--replicas", "2"], "with --target, list every running replica"),
        (["--target", "127.0.0.1:7070,127.0.0.1:7071"], "2 targets need one --ts-config each"),
        (["--target", "192.168.1.2:7070"], "non-loopback address '192.168.1.2'"),
        (["--profile", "nope"], "unknown profile 'nope'"),
    ]
    for argv, message in cases:
        assert run_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_worker_ledgers_merge_into_one() -> None:
    one, two = Ledger(), Ledger()
    for ledger, target, outcome, code in ((one, "a", Outcome.OK, "gRPC OK"), (one, "b", Outcome.BUSY, "HTTP 503"),
                                          (two, "a", Outcome.OK, "HTTP 200"), (two, "b", Outcome.OK, "gRPC OK")):
        ledger.send("unary", target)
        ledger.settle("unary", outcome, target, code)
    two.send("stream", "a")  # in flight
    assert two.in_flight() == 1
    merged = Ledger.merge([Ledger.from_dict(json.loads(json.dumps(ledger.to_dict()))) for ledger in (one, two)])
    data = merged.to_dict()
    assert data["totals"] == {"sent": 5, "answered": 4, "ok": 3, "busy": 1, "error": 0, "lost": 0, "unaccounted": 1}
    assert data["by_target"]["a"] == {"sent": 3, "answered": 2, "ok": 2, "busy": 0, "error": 0, "lost": 0,
                                      "unaccounted": 1, "codes": {"HTTP 200": 1, "gRPC OK": 1}}
    assert data["by_target"]["b"]["codes"] == {"HTTP 503": 1, "gRPC OK": 1}


def test_answers_no_repetition_can_change_end_the_run() -> None:
    assert all(refused_for_good(s) for s in ("INVALID_ARGUMENT", "UNAUTHENTICATED", 400, 401, 404))
    assert not any(refused_for_good(s) for s in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "OK", 503, 500, 200, None))


# ---------------------------------------------------------------------------- end to end (slow)
def served_model(request: pytest.FixtureRequest) -> Path:
    return EMBEDDED_MODEL if (EMBEDDED_MODEL / "unet").is_dir() else request.getfixturevalue("tiny_sd_dir")


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """One `python -m loadtest.run`: 1 Locust master + 2 workers against 2 replicas it starts on
    free loopback ports."""
    out = tmp_path_factory.mktemp("loadtest") / "results"
    command = [
        sys.executable, "-m", "loadtest.run", "--profile", "tiny", "--stages", STAGES,
        "--stage-seconds", str(STAGE_S), "--max-seconds", "45", "--workers", str(WORKERS),
        "--replicas", str(REPLICAS), "--job-queue-size", str(QUEUE), "--server-workers", "1",
        "--worker-threads", "1", "--scrape-interval", "1", "--model", str(served_model(request)), "--out", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
    return out, process, time.monotonic() - started


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_load_run_succeeds_and_stays_bounded(load_run) -> None:
    out, process, elapsed = load_run
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["stopped_wall"] - ledger["started_wall"] <= LOCUST_LIMIT_S
    assert ledger["drain"]["timed_out"] is False and sorted(ledger["drain"]["drained"]) == ["0", "1"]
    run = json.loads((out / "run.json").read_text())
    assert run["locust_exit_codes"] == {"master": 0, "worker0": 0, "worker1": 0}
    assert run["replicas"] == REPLICAS and run["workers"] == REPLICAS  # one TorchServe worker each
    print(f"\nload run: {elapsed:.0f} s in all, Locust {ledger['stopped_wall'] - ledger['started_wall']:.0f} s, "
          f"drain {ledger['drain']['seconds']} s")


@pytest.mark.slow
def test_both_workers_sent_and_both_replicas_served(load_run) -> None:
    out, _, _ = load_run
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["load_generator"] == {"mode": "distributed", "master": 1, "workers": WORKERS}
    targets = ledger["targets"]
    assert len(targets) == REPLICAS
    # Every worker sent requests, to both replicas (users alternate over the targets).
    workers = ledger["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    for worker in workers:
        assert worker["totals"]["sent"] > 0
        assert all(worker["by_target"][t]["sent"] > 0 for t in targets), worker
    assert sum(w["totals"]["sent"] for w in workers) == ledger["totals"]["sent"]
    assert not (out / "samples.jsonl").read_text().count('"worker": 2')  # only workers 0 and 1
    # Every replica served morphs, counted by status code, and nothing unexpected happened.
    scrapes: dict[str, list[dict]] = {}
    for scrape in read_samples(out / "torchserve_metrics.jsonl"):
        scrapes.setdefault(scrape["target"], []).append(scrape)
    for target in targets:
        counts = ledger["by_target"][target]
        codes = counts["codes"]
        assert counts["ok"] > 0 and counts["error"] == counts["lost"] == counts["unaccounted"] == 0, counts
        assert codes.get("gRPC OK", 0) + codes.get("HTTP 200", 0) == counts["ok"], codes
        assert codes.get("gRPC UNAVAILABLE", 0) + codes.get("gRPC INTERNAL", 0) + codes.get("HTTP 503", 0) \
            == counts["busy"], codes
        assert sum(codes.values()) == counts["sent"]
        # The replica's own count of the morphs it ran (the handler's MorphRequests counter).
        served = sum(v for k, v in counter_deltas_of(scrapes[target]).items() if k.startswith("MorphRequests"))
        assert served == counts["ok"], (target, served, counts)
    totals = ledger["totals"]
    assert totals["sent"] == totals["answered"] > 0
    assert totals["error"] == totals["lost"] == totals["unaccounted"] == 0
    by_mode = ledger["by_mode"]
    assert by_mode["predictions"]["ok"] > 0 and by_mode["unary"]["sent"] > 0 and by_mode["stream"]["sent"] > 0
    # The master's statistics (Locust's CSV) hold every request the workers sent: the drain
    # kept the master up until the workers' last report.
    stats = read_csv(out / "locust_stats.csv")
    primary = [r for r in stats if r["Type"] in ("gRPC", "REST") and r["Name"].endswith((" morph", " busy"))]
    assert sum(int(r["Request Count"]) for r in primary) == totals["sent"]
    assert sum(int(r["Failure Count"]) for r in primary if r["Name"].endswith(" morph")) == 0
    master_json = json.loads((out / "locust_stats.json").read_text())
    assert sum(e["num_requests"] for e in master_json if e["name"].endswith((" morph", " busy"))
               and e["method"] in ("gRPC", "REST")) == totals["sent"]
    print(f"\nper worker sent: {[w['totals']['sent'] for w in workers]}; per replica ok/busy: "
          f"{[(ledger['by_target'][t]['ok'], ledger['by_target'][t]['busy']) for t in targets]}")


@pytest.mark.slow
def test_combined_goodput_is_the_sum_of_the_replicas(load_run) -> None:
    out, _, _ = load_run
    summary = json.loads((out / "summary.json").read_text())
    ledger = json.loads((out / "ledger.json").read_text())
    rows, combined = summary["targets"], summary["combined"]
    assert [r["name"] for r in rows] == sorted(ledger["targets"])
    assert all(r["goodput_per_min"] > 0 for r in rows)
    assert combined["goodput_per_min"] == pytest.approx(sum(r["goodput_per_min"] for r in rows), abs=1e-9)
    assert combined["ok"] == sum(r["ok"] for r in rows) == ledger["totals"]["ok"]
    for index in range(len(summary["stages"])):
        assert combined["stage_goodput_per_min"][index] == pytest.approx(
            sum(r["stage_goodput_per_min"][index] for r in rows), abs=1e-9)
        assert combined["stage_goodput_per_min"][index] == pytest.approx(summary["stages"][index]["goodput_per_min"])
    # Recomputed from the raw samples: successful morphs that ended within the schedule, per minute.
    duration_s = min(STAGE_S * len(STAGES.split(",")), 45)
    samples = read_samples(out / "samples.jsonl")
    for row in rows:
        ended = [s for s in samples if s["target"] == row["name"] and s["type"] in ("gRPC", "REST")
                 and s["name"].endswith(" morph") and s["error"] is None
                 and s["ts"] - ledger["started_wall"] < duration_s]
        assert row["goodput_per_min"] == pytest.approx(len(ended) / (duration_s / 60.0))
    report = (out / "report.md").read_text()
    table = {r[0]: r for r in markdown_table(report, "## Per target (replica)")}
    assert float(table["**combined**"][7]) == pytest.approx(combined["goodput_per_min"], abs=0.005)
    for row in rows:
        assert float(table[row["name"]][7]) == pytest.approx(row["goodput_per_min"], abs=0.005)
    per_target = ", ".join(f"{r['name']} {r['goodput_per_min']:.1f}" for r in rows)
    print(f"\ngoodput/min: {per_target}, "
          f"combined {combined['goodput_per_min']:.1f} ({combined['ok']} morphs, {combined['sent']} requests)")


@pytest.mark.slow
def test_past_capacity_requests_get_a_fast_busy_answer(load_run) -> None:
    out, _, _ = load_run
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["totals"]["busy"] > 0, "5 users per replica on 1 worker + a queue of 2 must be refused some"
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
    for name in ("report.md", "report.png", "summary.json", "locust_stats_history.csv", "torchserve_metrics.jsonl",
                 "ledger.master.json", "ledger.worker0.json", "ledger.worker1.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consistency_problems"] == []
    # Whole-run table == locust_stats.csv, entry by entry.
    rows = {(r[0], r[1]): r[2:] for r in markdown_table(report, "## Whole run")}
    stats = [r for r in read_csv(out / "locust_stats.csv") if r["Name"] != "Aggregated"]
    assert len(rows) == len(stats)
    for row in stats:
        cells = rows[(row["Type"], row["Name"])]
        for column, cell in zip(WHOLE_RUN_COLUMNS, cells):
            assert float(cell) == pytest.approx(float(row[column]), abs=0.051), (row["Name"], column)
    # Per-stage table adds up to the ledger; the headline numbers are the ledger's.
    totals = summary["ledger"]
    stages = markdown_table(report, "## Per stage")
    assert [int(r[0]) for r in stages] == [int(u) for u in STAGES.split(",")]
    assert sum(int(r[1]) for r in stages) == totals["sent"]
    assert sum(int(r[2]) for r in stages) == totals["ok"]
    assert sum(int(r[3]) for r in stages) == totals["busy"]
    assert f"**{totals['sent']} requests sent, {totals['answered']} answered**" in report
    workers = markdown_table(report, "## Load generator")
    assert [int(r[1]) for r in workers] == [w["totals"]["sent"] for w in summary["workers"]]
    # The capacity recommendation is stated with numbers.
    capacity = summary["capacity"]
    assert f"minWorkers = {capacity['min_workers']}" in report
    assert f"job_queue_size = {capacity['job_queue_size']}" in report
    assert capacity["per_worker_per_min"] is None or capacity["per_worker_per_min"] > 0


# ---------------------------------------------------------------------------- a run that cannot succeed
@pytest.mark.slow
def test_a_request_the_server_refuses_for_good_ends_the_run_with_its_message(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """No option check in the load generator: the server refuses the unknown option, and the
    first refusal stops the run (instead of a minute of 400s) with the server's message."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(json.dumps({"profiles": {"typo": {
        "images": ["red_circle.png", "blue_triangle.png"],
        "options": {"num_frames": 4, "lora_steps": 3, "num_inference_steps": 6, "num_framez": 4},
        "deadline_s": 60, "p95_target_s": 30}}}))
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "loadtest.run", "--profiles-file", str(profiles), "--profile", "typo",
        "--stages", "3", "--stage-seconds", "120", "--max-seconds", "120", "--workers", "1", "--replicas", "1",
        "--server-workers", "1", "--scrape-interval", "1", "--model", str(served_model(request)), "--out", str(out),
    ]  # fmt: skip
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 1, process.stdout[-3000:] + process.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert "num_framez" in ledger["aborted"], ledger["aborted"]
    assert "the run was stopped early" in process.stderr and "num_framez" in process.stderr
    assert ledger["stopped_wall"] - ledger["started_wall"] < 30  # not the 120 s schedule
    totals = ledger["totals"]
    assert 1 <= totals["error"] == totals["sent"] <= 3  # one request per user at most, all refused
    codes = ledger["by_target"][ledger["targets"][0]]["codes"]
    assert set(codes) <= {"gRPC INVALID_ARGUMENT", "HTTP 400"}, codes
    assert "stopped early" in (out / "report.md").read_text()
    print(f"\nrefused run: {totals['sent']} request(s), {ledger['stopped_wall'] - ledger['started_wall']:.1f} s; "
          f"{ledger['aborted'][:160]}")
