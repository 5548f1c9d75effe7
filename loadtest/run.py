"""One capacity run: TorchServe (started here, or a running one), Locust headless, metrics
scraping, then the report. Everything on loopback; every step is bounded in time.

    python -m loadtest.run                                  # own server, tiny profile, 1,2,4,24 users
    python -m loadtest.run --target 127.0.0.1:7070          # a running `make serve`
    python -m loadtest.run --profile default --stages 1,2 --stage-seconds 600

Own server: the embedded model is exported afresh (`python -m export`, no-archive layout, so the
served handler is the checked-out one and the queue/worker settings can be overridden for the
run) and served by tests/torchserve_server.TorchServeProcess with the repository's
config.properties on free loopback ports, its workers limited to --worker-threads torch threads.
Results land in loadtest/results/<UTC timestamp>/: Locust CSVs, samples, ledger, scraped metrics,
report.md, report.png, summary.json. Exit status: 0 when every request was answered and none
failed unexpectedly (refusals past capacity are expected), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from client.auth import TokenError, read_key_file
from guard.management import read_properties
from loadtest.profiles import ProfileError, check_options, load_profile
from loadtest.report import CSV_PREFIX, write_report
from loadtest.scrape import Scraper, read_samples
from loadtest.schedule import StepSchedule

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-shapes-sd"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
MODEL_NAME = "diffmorpher"


@dataclass(frozen=True)
class Endpoints:
    grpc_target: str
    rest_url: str
    management_url: str
    metrics_url: str
    key_file: Path

    def check_loopback(self) -> None:
        hosts = [self.grpc_target.rsplit(":", 1)[0].strip("[]")]
        hosts += [urlsplit(url).hostname or "" for url in (self.rest_url, self.management_url, self.metrics_url)]
        for host in hosts:
            if host not in LOOPBACK:
                raise SystemExit(f"loadtest: refusing non-loopback address {host!r}")


def endpoints_of_running(target: str, ts_config: Path, key_file: Path) -> Endpoints:
    """A running server: gRPC at `target`, the HTTP addresses from the config it was started with."""
    props = read_properties(ts_config)
    return Endpoints(
        grpc_target=target,
        rest_url=props.get("inference_address", "http://127.0.0.1:8080"),
        management_url=props.get("management_address", "http://127.0.0.1:8081"),
        metrics_url=props.get("metrics_address", "http://127.0.0.1:8082"),
        key_file=key_file,
    )


# ---------------------------------------------------------------------------- own server
def export_model(model: Path, store: Path, job_queue_size: int | None, workers: int | None) -> None:
    """Fresh no-archive export, with the run's queue and worker overrides in its model-config
    (model-config.yaml wins over config.properties' job_queue_size in TorchServe 0.12)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'handler'}{os.pathsep}{REPO_ROOT}"}
    subprocess.run(
        [sys.executable, "-m", "export", "--model", str(model), "--export-path", str(store),
         "--archive-format", "no-archive"],
        cwd=REPO_ROOT, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    config_path = store / MODEL_NAME / "model-config.yaml"
    config = yaml.safe_load(config_path.read_text())
    if job_queue_size is not None:
        config["jobQueueSize"] = job_queue_size
    if workers is not None:
        config["minWorkers"] = config["maxWorkers"] = workers
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_server(out: Path, args: argparse.Namespace, stack: ExitStack) -> Endpoints:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.torchserve_server import TorchServeProcess

    store = out / "model_store"
    export_model(Path(args.model), store, args.job_queue_size, args.workers)
    # Workers inherit the frontend's environment: one torch thread each unless told otherwise
    # (on a few shared cores, more threads per process oversubscribe and run ~10x slower).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.worker_threads)
    server = TorchServeProcess(out / "server", store, model_name=MODEL_NAME, archive=MODEL_NAME)
    server.start(timeout_s=args.startup_timeout)
    stack.callback(server.stop)
    return Endpoints(
        grpc_target=server.grpc_target,
        rest_url=server.url("inference", ""),
        management_url=server.url("management", ""),
        metrics_url=server.url("metrics", ""),
        key_file=server.key_file,
    )


# ---------------------------------------------------------------------------- locust
def locust_command(args: argparse.Namespace, endpoints: Endpoints, out: Path, stop_timeout: float) -> list[str]:
    return [
        str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless",
        "--host", endpoints.rest_url, "--grpc-target", endpoints.grpc_target,
        "--key-file", str(endpoints.key_file), "--request-profile", args.profile,
        "--profiles-file", str(args.profiles_file),
        "--stages", args.stages, "--stage-seconds", str(args.stage_seconds),
        "--max-seconds", str(args.max_seconds), "--think-seconds", str(args.think_seconds),
        "--stop-timeout", f"{int(math.ceil(stop_timeout))}s",
        "--csv", str(out / CSV_PREFIX), "--csv-full-history",
        "--samples-file", str(out / "samples.jsonl"), "--ledger-file", str(out / "ledger.json"),
        "--only-summary", "--loglevel", "INFO",
    ]  # fmt: skip


def run_locust(command: list[str], out: Path, timeout_s: float) -> int:
    """Locust in its own process group, killed (the group only) if it overruns `timeout_s`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with (out / "locust.out").open("wb") as log:
        process = subprocess.Popen(command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return 124


# ---------------------------------------------------------------------------- run info
def machine_info() -> dict[str, str]:
    info = {"platform": platform.platform(), "gpu": "no GPU" if shutil.which("nvidia-smi") is None else "GPU present"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = f"{int(line.split()[1]) / 2**20:.0f}"
        info["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def server_settings(scrape_file: Path) -> dict[str, int | None]:
    """Workers and queue size as the server reported them (pending + remaining capacity)."""
    for sample in read_samples(scrape_file):
        queue = sample.get("queue") or {}
        if queue.get("remaining") is not None:
            return {"workers": len(sample.get("workers") or []) or None,
                    "job_queue_size": int(queue["remaining"]) + int(queue.get("pending") or 0)}
    return {"workers": None, "job_queue_size": None}


def management_token(key_file: Path):
    def token() -> str | None:
        try:
            return read_key_file(key_file, "management")
        except TokenError:
            return None

    return token


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--profiles-file", type=Path, default=REPO_ROOT / "loadtest" / "profiles.yaml")
    parser.add_argument("--stages", default="1,2,4,24", help="users per stage")
    parser.add_argument("--stage-seconds", type=float, default=60.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard limit on all stages")
    parser.add_argument("--think-seconds", type=float, default=0.0)
    parser.add_argument("--p95-target", type=float, help="seconds (default: the profile's)")
    parser.add_argument("--out", type=Path, help="results directory (default: loadtest/results/<UTC time>)")
    parser.add_argument("--target", default="", help="gRPC address of a running TorchServe (else start one)")
    parser.add_argument("--ts-config", type=Path, default=REPO_ROOT / "config.properties",
                        help="config of the running server (its HTTP addresses)")
    parser.add_argument("--key-file", type=Path, default=REPO_ROOT / "key_file.json",
                        help="key file of the running server")
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="weights to export and serve")
    parser.add_argument("--workers", type=int, help="override minWorkers = maxWorkers")
    parser.add_argument("--job-queue-size", type=int, help="override the model's jobQueueSize")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (with --target: what the running server uses)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--scrape-interval", type=float, default=2.0)
    parser.add_argument("--note", default="", help="free text for the report (e.g. what else ran on the host)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile, args.profiles_file)
        sys.path.insert(0, str(REPO_ROOT / "handler"))
        check_options(profile)
        schedule = StepSchedule.parse(args.stages, args.stage_seconds, args.max_seconds)
    except (ProfileError, ValueError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    out = args.out or RESULTS_DIR / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    stop_timeout = profile.deadline_s + 10.0  # in-flight requests finish or hit their deadline
    with ExitStack() as stack:
        if args.target:
            endpoints = endpoints_of_running(args.target, args.ts_config, args.key_file)
            endpoints.check_loopback()
            server = f"running at {args.target}"
        else:
            print(f"loadtest: exporting {args.model} and starting TorchServe ...", flush=True)
            endpoints = start_server(out, args, stack)
            server = "started for this run (repository config.properties, free loopback ports)"
        endpoints.check_loopback()
        scrape_file = out / "torchserve_metrics.jsonl"
        scraper = Scraper(
            metrics_url=f"{endpoints.metrics_url}/metrics",
            describe_url=f"{endpoints.management_url}/models/{MODEL_NAME}",
            out=scrape_file, management_token=management_token(endpoints.key_file),
            interval_s=args.scrape_interval,
        ).start()  # fmt: skip
        stack.callback(scraper.stop)
        command = locust_command(args, endpoints, out, stop_timeout)
        limit = schedule.duration_s + stop_timeout + 120.0
        print(f"loadtest: Locust for {schedule.duration_s:.0f} s (stages {args.stages}), results in {out}", flush=True)
        started_monotonic = time.monotonic()
        rc = run_locust(command, out, limit)
        print(f"loadtest: Locust exited with {rc} after {time.monotonic() - started_monotonic:.0f} s", flush=True)
        time.sleep(args.scrape_interval)  # one more scrape after the last answer
    run_info = {
        "started_iso": started.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
        "threads_per_worker": args.worker_threads,  # with --target: as the running server was started
        "think_seconds": args.think_seconds,
        "note": args.note,
        "scrape_interval_s": args.scrape_interval,
        "server": server,
        "model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT) else args.model),
        "locust_version": importlib.metadata.version("locust"),
        "torchserve_version": importlib.metadata.version("torchserve"),
        "locust_exit_code": rc,
        "command": command,
        **server_settings(scrape_file),
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if not (out / "ledger.json").is_file() or not (out / f"{CSV_PREFIX}_stats.csv").is_file():
        print(f"loadtest: Locust wrote no results; see {out / 'locust.out'}", file=sys.stderr)
        return 1
    summary = write_report(out, args.p95_target)
    totals, cap = summary["ledger"], summary["capacity"]
    print(f"loadtest: sent {totals['sent']}, answered {totals['answered']} (ok {totals['ok']}, busy "
          f"{totals['busy']}, errors {totals['error']}), lost {totals['lost']}", flush=True)
    print(f"loadtest: {cap['per_worker_per_min']} morphs/min per worker at p95 <= {cap['p95_target_s']} s; "
          f"minWorkers={cap['min_workers']} maxWorkers={cap['max_workers']} job_queue_size={cap['job_queue_size']}")
    print(f"loadtest: report {out / 'report.md'}")
    return 0 if rc == 0 and not summary["consistency_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
