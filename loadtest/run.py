"""One capacity run: TorchServe replicas (started here, or running ones), Locust in distributed
mode (one master, N workers), metrics scraping, then the report. Everything on loopback; every
step is bounded in time.

    python -m loadtest.run                                   # own server, 1 Locust worker, 1,2,4,24 users
    python -m loadtest.run --workers 2 --replicas 2          # 1 master + 2 workers, two own replicas
    python -m loadtest.run --target 127.0.0.1:7070           # a running `make serve`
    python -m loadtest.run --target 127.0.0.1:7070,127.0.0.1:7071 --ts-config a.properties --ts-config b.properties
    python -m loadtest.run --profile default --stages 1,2 --stage-seconds 600

Own servers: the embedded model is exported afresh (`python -m export`, no-archive layout, so the
served handler is the checked-out one and the queue/worker settings can be overridden for the
run) and served by --replicas launcher.torchserve.TorchServeProcess instances (TorchServe +
guard each, started side by side) with the repository's config.properties on free loopback
ports, their workers limited to --worker-threads torch threads. Running servers: one --target
per replica (repeated or comma-separated), with its config (--ts-config: its REST, management and
metrics addresses) and key file (--key-file), each once for all or once per target.

Locust: one `locust --master` (headless, the step shape, --expect-workers N, the CSV/JSON
statistics) and N `locust --worker` processes, each in its own process group, killed (the groups
only) if the run overruns. The users spread over the targets (loadtest/targets.py); the workers'
samples and ledgers are merged (loadtest/merge.py) before the report. Results land in
loadtest/results/<UTC timestamp>/. Exit status: 0 when every request was answered and none failed
unexpectedly (refusals past capacity are expected), 1 otherwise, 2 for unusable arguments.
Nothing here imports the morph core (no torch in the load generator): option names and values
are checked by the server, and the first request it refuses for good ends the run with its message.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit


from morph_protocol.keyfile import TokenError, read_key_file
from morph_protocol.properties import read_properties
from launcher.archive import MODEL_NAME, export_model
from launcher.torchserve import TorchServeProcess
from loadtest.merge import MergeError, merge_results
from loadtest.profiles import Profile, ProfileError, load_profile
from loadtest.report import CSV_PREFIX, read_csv, write_report
from loadtest.schedule import StepSchedule
from loadtest.scrape import Scraper, ScrapeSource, read_samples
from loadtest.targets import LOOPBACK_HOSTS, TargetError, per_target, split_list

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
EMBEDDED_MODEL = REPO_ROOT / "models" / "tiny-shapes-sd"
WORKERS_CONNECT_S = 60  # the master gives up when its workers have not all connected by then
WORKERS_EXIT_S = 30  # after the master has quit, a worker still running is killed


@dataclass(frozen=True)
class Endpoints:
    """One replica's addresses."""

    grpc_target: str
    rest_url: str
    management_url: str
    metrics_url: str
    key_file: Path

    def check_loopback(self) -> None:
        hosts = [self.grpc_target.rsplit(":", 1)[0].strip("[]")]
        hosts += [urlsplit(url).hostname or "" for url in (self.rest_url, self.management_url, self.metrics_url)]
        for host in hosts:
            if host not in LOOPBACK_HOSTS:
                raise TargetError(f"refusing non-loopback address {host!r}")


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


def running_endpoints(args: argparse.Namespace) -> list[Endpoints]:
    """--target (repeated or comma-separated) with its --ts-config / --key-file: one for all, or
    one per target. Several targets need one config each: it is what tells their REST,
    management and metrics addresses apart."""
    targets = split_list(args.target)
    configs = [Path(p) for p in split_list(args.ts_config)] or [REPO_ROOT / "config.properties"]
    keys = [Path(p) for p in split_list(args.key_file)] or [REPO_ROOT / "key_file.json"]
    if len(targets) > 1 and len(configs) != len(targets):
        raise TargetError(f"{len(targets)} targets need one --ts-config each (their HTTP addresses), got {len(configs)}")
    if len(set(targets)) != len(targets):
        raise TargetError(f"a target is listed twice: {targets}")
    endpoints = [endpoints_of_running(t, c, k) for t, c, k in
                 zip(targets, per_target(configs, len(targets), "--ts-config"), per_target(keys, len(targets), "--key-file"))]
    if len({e.rest_url for e in endpoints}) != len(endpoints):
        raise TargetError("two targets have the same REST address: check their --ts-config files")
    for endpoint in endpoints:
        endpoint.check_loopback()
    return endpoints


# ---------------------------------------------------------------------------- own server
def start_servers(out: Path, args: argparse.Namespace, stack: ExitStack) -> list[Endpoints]:
    """Export once, then start --replicas TorchServe + guard instances side by side (each waits
    for its worker; started one after the other they would take that long each)."""
    store = out / "model_store"
    export_model(Path(args.model), store, "--archive-format", "no-archive",
                 job_queue_size=args.job_queue_size, workers=args.server_workers, quiet=True)
    # Workers inherit the frontend's environment: one torch thread each unless told otherwise
    # (on a few shared cores, more threads per process oversubscribe and run ~10x slower).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.worker_threads)
    servers = [TorchServeProcess(out / f"server-{i}", store, model_name=MODEL_NAME, archive=MODEL_NAME)
               for i in range(args.replicas)]
    for server in servers:
        stack.callback(server.stop)  # stop() is a no-op for one that never started
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for future in [pool.submit(server.start, timeout_s=args.startup_timeout) for server in servers]:
            future.result()
    return [
        Endpoints(
            grpc_target=server.grpc_target,
            rest_url=server.url("inference", ""),
            management_url=server.url("management", ""),
            metrics_url=server.url("metrics", ""),
            key_file=server.key_file,
        )
        for server in servers
    ]


# ---------------------------------------------------------------------------- locust
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def locust_options(args: argparse.Namespace, endpoints: list[Endpoints], out: Path) -> list[str]:
    """The locustfile's own options; the master and every worker get the same ones (the workers
    take them over from the master anyway, and need them at start-up)."""
    return [
        str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE),
        "--host", endpoints[0].rest_url,
        "--grpc-target", ",".join(e.grpc_target for e in endpoints),
        "--rest-url", ",".join(e.rest_url for e in endpoints),
        "--key-file", ",".join(str(e.key_file) for e in endpoints),
        "--request-profile", args.profile, "--profiles-file", str(args.profiles_file),
        "--stages", args.stages, "--stage-seconds", str(args.stage_seconds),
        "--max-seconds", str(args.max_seconds), "--think-seconds", str(args.think_seconds),
        "--samples-file", str(out / "samples.jsonl"), "--ledger-file", str(out / "ledger.json"),
        "--loglevel", "INFO",
    ]  # fmt: skip


def master_command(common: list[str], args: argparse.Namespace, out: Path, port: int, stop_timeout: float) -> list[str]:
    return [
        *common, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
        "--expect-workers", str(args.workers), "--expect-workers-max-wait", str(WORKERS_CONNECT_S),
        "--headless", "--stop-timeout", f"{int(stop_timeout + 0.999)}s",
        "--csv", str(out / CSV_PREFIX), "--csv-full-history", "--json-file", str(out / "locust_stats"),
        "--only-summary",
    ]  # fmt: skip


def worker_command(common: list[str], port: int) -> list[str]:
    return [*common, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]


def start_process(command: list[str], out: Path, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (out / log_name).open("wb") as log:
        return subprocess.Popen(command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(process: subprocess.Popen) -> int:
    """Kill the process's own group (nothing else) and reap it; 124 marks the overrun."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    return 124


def run_locust(master: list[str], workers: list[list[str]], out: Path, timeout_s: float) -> dict[str, int]:
    """The master, then its workers; exit codes by process ("master", "worker0", ...). The master
    ends the run (its shape, then the drain); workers exit when it tells them to quit."""
    processes = {"master": start_process(master, out, "locust.out")}
    for index, command in enumerate(workers):
        processes[f"worker{index}"] = start_process(command, out, f"locust-worker{index}.out")
    codes = {}
    try:
        try:
            codes["master"] = processes["master"].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            codes["master"] = stop_group(processes["master"])
        deadline = time.monotonic() + WORKERS_EXIT_S
        for name, process in processes.items():
            if name == "master":
                continue
            try:
                codes[name] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = stop_group(process)
    finally:
        for name, process in processes.items():
            if process.poll() is None:
                codes[name] = stop_group(process)
    return codes


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
    """Workers (summed over the replicas) and queue size (per replica) as the servers reported
    them (pending + remaining capacity), from each replica's first complete sample."""
    first: dict[str, dict] = {}
    for sample in read_samples(scrape_file):
        if (sample.get("queue") or {}).get("remaining") is not None:
            first.setdefault(str(sample.get("target") or ""), sample)
    if not first:
        return {"workers": None, "job_queue_size": None}
    samples = list(first.values())
    queue = samples[0]["queue"]
    return {"workers": sum(len(s.get("workers") or []) for s in samples) or None,
            "job_queue_size": int(queue["remaining"]) + int(queue.get("pending") or 0)}


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
    parser.add_argument("--stages", default="1,2,4,24", help="users per stage (all workers together)")
    parser.add_argument("--stage-seconds", type=float, default=60.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard limit on all stages")
    parser.add_argument("--think-seconds", type=float, default=0.0)
    parser.add_argument("--p95-target", type=float, help="seconds (default: the profile's)")
    parser.add_argument("--out", type=Path, help="results directory (default: loadtest/results/<UTC time>)")
    parser.add_argument("--workers", type=int, default=1, help="Locust worker processes (one master besides)")
    parser.add_argument("--target", action="append",
                        help="gRPC address of a running replica (repeat or comma-separate for several; "
                             "else own replicas are started)")
    parser.add_argument("--ts-config", action="append",
                        help="config.properties of the running replica(s): one for all, or one per --target "
                             "(default: the repository's)")
    parser.add_argument("--key-file", action="append",
                        help="key_file.json of the running replica(s): one for all, or one per --target "
                             "(default: the repository's)")
    parser.add_argument("--replicas", type=int, default=1, help="own replicas to start (without --target)")
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="weights to export and serve")
    parser.add_argument("--server-workers", type=int, help="override minWorkers = maxWorkers of each own replica")
    parser.add_argument("--job-queue-size", type=int, help="override the model's jobQueueSize")
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="torch threads per TorchServe worker (with --target: what the running server uses)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--scrape-interval", type=float, default=2.0)
    parser.add_argument("--note", default="", help="free text for the report (e.g. what else ran on the host)")
    return parser


@dataclass(frozen=True)
class Plan:
    profile: Profile
    schedule: StepSchedule
    running: list[Endpoints]  # empty: start own replicas


def plan(args: argparse.Namespace) -> Plan:
    """Everything checkable before a server or Locust starts (no morph core involved)."""
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.target and args.replicas != 1:
        raise ValueError("--replicas starts own servers; with --target, list every running replica instead")
    profile = load_profile(args.profile, args.profiles_file)
    profile.inputs()  # the images exist
    schedule = StepSchedule.parse(args.stages, args.stage_seconds, args.max_seconds)
    return Plan(profile, schedule, running_endpoints(args) if args.target else [])


def unexpected_errors(out: Path, limit: int = 5) -> list[str]:
    """The most frequent non-busy failures Locust recorded, with the server's message."""
    rows = [r for r in read_csv(out / f"{CSV_PREFIX}_failures.csv") if not r["Name"].endswith(" busy")]
    rows.sort(key=lambda r: -int(r["Occurrences"]))
    return [f"{r['Occurrences']} x {r['Method']} {r['Name']}: {r['Error']}" for r in rows[:limit]]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        the_plan = plan(args)
    except (ProfileError, TargetError, ValueError, OSError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    profile, schedule = the_plan.profile, the_plan.schedule
    started = datetime.now(timezone.utc)
    out = args.out or RESULTS_DIR / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    stop_timeout = profile.deadline_s + 10.0  # in-flight requests finish or hit their deadline
    with ExitStack() as stack:
        if the_plan.running:
            endpoints = the_plan.running
            server = f"running at {', '.join(e.grpc_target for e in endpoints)}"
        else:
            print(f"loadtest: exporting {args.model} and starting {args.replicas} TorchServe replica(s) ...", flush=True)
            endpoints = start_servers(out, args, stack)
            server = (f"{len(endpoints)} replica(s) started for this run (repository config.properties, "
                      "free loopback ports)")
        for endpoint in endpoints:
            endpoint.check_loopback()
        scrape_file = out / "torchserve_metrics.jsonl"
        scraper = Scraper(
            sources=[ScrapeSource(e.grpc_target, f"{e.metrics_url}/metrics", f"{e.management_url}/models/{MODEL_NAME}",
                                  management_token(e.key_file)) for e in endpoints],
            out=scrape_file, interval_s=args.scrape_interval,
        ).start()  # fmt: skip
        stack.callback(scraper.stop)
        common = locust_options(args, endpoints, out)
        port = free_port()
        master = master_command(common, args, out, port, stop_timeout)
        workers = [worker_command(common, port) for _ in range(args.workers)]
        # The schedule, the workers' start, the drain (bounded by the stop timeout) and slack.
        limit = schedule.duration_s + stop_timeout + WORKERS_CONNECT_S + 120.0
        print(f"loadtest: Locust 1 master + {args.workers} worker(s) -> {len(endpoints)} target(s) for "
              f"{schedule.duration_s:.0f} s (stages {args.stages}), results in {out}", flush=True)
        started_monotonic = time.monotonic()
        codes = run_locust(master, workers, out, limit)
        print(f"loadtest: Locust exited with {codes} after {time.monotonic() - started_monotonic:.0f} s", flush=True)
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
        "replicas": len(endpoints),
        "targets": [e.grpc_target for e in endpoints],
        "model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT) else args.model),
        "locust_version": importlib.metadata.version("locust"),
        "torchserve_version": importlib.metadata.version("torchserve"),
        "locust_workers": args.workers,
        "locust_exit_codes": codes,
        "commands": {"master": master, "worker": workers[0]},
        **server_settings(scrape_file),
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    try:
        ledger = merge_results(out, args.workers)
    except MergeError as error:
        print(f"loadtest: {error}; see {out / 'locust.out'} and {out}/locust-worker*.out", file=sys.stderr)
        return 1
    if not (out / f"{CSV_PREFIX}_stats.csv").is_file():
        print(f"loadtest: Locust wrote no statistics; see {out / 'locust.out'}", file=sys.stderr)
        return 1
    summary = write_report(out, args.p95_target)
    totals, cap = summary["ledger"], summary["capacity"]
    print(f"loadtest: sent {totals['sent']}, answered {totals['answered']} (ok {totals['ok']}, busy "
          f"{totals['busy']}, errors {totals['error']}), lost {totals['lost']}", flush=True)
    for worker in summary["workers"]:
        print(f"loadtest: Locust worker {worker['index']}: sent {worker['totals']['sent']}, ok {worker['totals']['ok']}")
    for row in [*summary["targets"], summary["combined"]]:
        print(f"loadtest: {row['name']}: {row['ok']} morphs, goodput {row['goodput_per_min']:.2f}/min")
    print(f"loadtest: {cap['per_worker_per_min']} morphs/min per worker at p95 <= {cap['p95_target_s']} s; "
          f"minWorkers={cap['min_workers']} maxWorkers={cap['max_workers']} job_queue_size={cap['job_queue_size']}")
    if ledger.get("aborted"):
        print(f"loadtest: the run was stopped early: {ledger['aborted']}", file=sys.stderr)
    for line in unexpected_errors(out):
        print(f"loadtest: unexpected: {line}", file=sys.stderr)
    print(f"loadtest: report {out / 'report.md'}")
    bad = totals["error"] + totals["lost"] + totals["unaccounted"]
    clean = not bad and not ledger.get("aborted") and not summary["consistency_problems"]
    return 0 if clean and all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
