"""Locust users for the morph service: gRPC (unary and streaming) and REST `/predictions`.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \
        --grpc-target 127.0.0.1:7070 --key-file key_file.json --request-profile tiny --stages 1,2,4

(`python -m loadtest.run` / `make loadtest` run it in Locust's distributed mode, one master and
N workers, against one or more replicas, then write a report.)

gRPC has no Locust client, so the users call the service through the project's own client
library (client.morph_client.MorphClient: channel, token metadata, request building) and fire
Locust `request` events themselves: one per morph, plus, for streams, time to first frame and
the time between streamed frames as their own entries, plus the worker's own morph time (from
the result's metadata; TorchServe's latency metrics do not cover gRPC). Refusals because the
queue is full go to "<mode> busy" entries, never into the morph entries (see outcomes.py), and a
refused user backs off exponentially. Every request is counted in a ledger of sent vs answered.

Several targets (replicas): `--grpc-target`, `--rest-url` and `--key-file` take comma-separated
lists, one entry per replica; users spread over them round-robin (loadtest/targets.py), and
every sample and ledger entry names its target.

Distributed mode: the master runs the step shape and collects Locust's statistics (CSV); each
worker runs users and writes its own samples and ledger (`<name>.worker<i>.<ext>`, i = Locust's
worker index), which the runner merges. At the end of the schedule the master does not just quit
(Locust's headless master quits 0.5 s after telling the workers, before their last requests are
answered and reported): it sends `morph_drain`, every worker stops sending, waits for its
requests in flight, lets one more statistics report go out and answers `morph_drained`; then
the master quits. A worker that gets an answer no repetition can change (bad options, bad token,
unknown model) sends `morph_abort` with the server's message and the run drains at once.
"""

from __future__ import annotations

# gRPC's C core must cooperate with gevent, on which Locust runs its users; this has to happen
# before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

# Locust puts only the locustfile's own directory on sys.path; the client and loadtest packages
# come from the installed project (make setup).
import gevent  # noqa: E402
from locust import stats as locust_stats  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner, WorkerRunner  # noqa: E402

from morph_protocol import wire  # noqa: E402
from morph_protocol.keyfile import TokenSource  # noqa: E402
from client.morph_client import MorphClient, MorphClientError, MorphResult, build_input  # noqa: E402
from client.rest import RestClient, RestNoAnswer  # noqa: E402
from loadtest.outcomes import (  # noqa: E402
    Backoff,
    Ledger,
    Outcome,
    ServerBusy,
    UnexpectedAnswer,
    classify_grpc,
    classify_http,
    refused_for_good,
)
from loadtest.profiles import PROFILES_FILE, Profile, load_profile  # noqa: E402
from loadtest.schedule import StepSchedule  # noqa: E402
from loadtest.targets import Target, TargetError, build_targets, split_list, target_index  # noqa: E402

logger = logging.getLogger("loadtest")

SPAWN_RATE = 100.0  # users per second: a step is (nearly) instantaneous
GRPC = "gRPC"
REST = "REST"
HANDLER = "handler"


def series(mode: str, outcome: str) -> str:
    """Locust entry name: "<mode> morph" for answers, "<mode> busy" for refusals."""
    return f"{mode} {outcome}"


# ---------------------------------------------------------------------------- options
@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("morph service load test")
    group.add_argument("--request-profile", default="tiny", help="request profile (loadtest/profiles.yaml)")
    group.add_argument("--profiles-file", default=str(PROFILES_FILE))
    group.add_argument("--grpc-target", default="127.0.0.1:7070",
                       help="gRPC inference address(es), comma-separated: one per replica")
    group.add_argument("--rest-url", default="",
                       help="REST base URL(s), comma-separated, one per gRPC target (default: --host)")
    group.add_argument("--model-name", default="diffmorpher")
    group.add_argument("--key-file", default="key_file.json",
                       help="TorchServe's key_file.json: one for all replicas, or one per replica (comma-separated)")
    group.add_argument("--no-token", action="store_true", help="server runs without token auth")
    group.add_argument("--stages", default="1,2,4", help="users per stage, e.g. 1,2,4")
    group.add_argument("--stage-seconds", type=float, default=60.0)
    group.add_argument("--max-seconds", type=float, default=600.0, help="hard limit for all stages")
    group.add_argument("--think-seconds", type=float, default=0.0, help="wait after an answer")
    group.add_argument("--backoff-seconds", type=float, default=1.0, help="first wait after busy")
    group.add_argument("--backoff-max-seconds", type=float, default=16.0)
    group.add_argument("--seed", type=int, default=1234, help="per-user request seeds derive from it")
    group.add_argument("--samples-file", default="", help="JSON lines, one per Locust request event")
    group.add_argument("--ledger-file", default="", help="JSON: sent vs answered, stages, profile")


def process_file(path: str, runner: Any) -> Path | None:
    """Where this Locust process writes the file named `path`: as given when it runs alone,
    `<stem>.worker<i><suffix>` on worker i, `<stem>.master<suffix>` on the master (several
    processes, one name: the workers take it from the master's options)."""
    if not path:
        return None
    given = Path(path)
    if isinstance(runner, WorkerRunner):
        return given.with_name(f"{given.stem}.worker{runner.worker_index}{given.suffix}")
    if isinstance(runner, MasterRunner):
        return given.with_name(f"{given.stem}.master{given.suffix}")
    return given


# ---------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Everything one Locust process shares between its users: the profile and its inputs, the
    schedule, the ledger and the sample log. Attached to the Environment (Locust's per-run
    object) instead of module globals, so nothing leaks between runs in one interpreter."""

    options: Any
    profile: Profile
    images: list[bytes]
    prompts: list[str]
    schedule: StepSchedule
    targets: list[Target]
    worker_index: int = 0  # Locust's index of this worker (0 when running alone)
    ledger: Ledger = field(default_factory=Ledger)
    loop_lag: LoopLagMonitor = field(default_factory=lambda: LoopLagMonitor())
    started_wall: float = field(default_factory=time.time)
    samples: IO[str] | None = None
    stopping: bool = False  # set when Locust starts stopping users: no new request may leave
    aborted: str = ""  # why the run was cut short (a request refused for good), "" if it was not
    drain: Drain | None = None  # the master's end-of-run handshake with its workers
    user_ids: itertools.count = field(default_factory=itertools.count)

    def tokens(self, target: Target) -> TokenSource:
        if self.options.no_token or not target.key_file:
            return TokenSource(enabled=False)
        return TokenSource(key_file=target.key_file)

    def record(self, request_type: str, name: str, response_time: float, response_length: int,
               exception: BaseException | None = None, context: dict | None = None, **_: Any) -> None:
        """`request` event listener: one JSON line per event, so the report can cut the run into
        stages exactly (Locust's CSVs only hold whole-run and 10 s rolling percentiles)."""
        if self.samples is None:
            return
        context = context or {}
        sample = {
            "ts": round(time.time(), 4),
            "type": request_type,
            "name": name,
            "ms": round(float(response_time), 3),
            "bytes": int(response_length or 0),
            "error": None if exception is None else f"{type(exception).__name__}: {exception}",
            "users": context.get("users"),
            "target": context.get("target"),
            "worker": self.worker_index,
        }
        self.samples.write(json.dumps(sample) + "\n")


class LoopLagMonitor:
    """How late this process's gevent loop wakes a sleeping greenlet. Every latency Locust
    reports includes that delay, so a run whose client stalled says so instead of blaming the
    server (seen here: gRPC calls parked in gevent's default 10-thread pool delayed answers by
    tens of seconds)."""

    PERIOD_S = 0.25

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._greenlet: gevent.Greenlet | None = None

    def _run(self) -> None:
        while True:
            before = time.perf_counter()
            gevent.sleep(self.PERIOD_S)
            self.lags.append(max(0.0, time.perf_counter() - before - self.PERIOD_S))

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def summary(self) -> dict[str, float | None]:
        ordered = sorted(self.lags)
        if not ordered:
            return {"max_s": None, "p99_s": None}
        return {"max_s": round(ordered[-1], 4), "p99_s": round(ordered[int(0.99 * (len(ordered) - 1))], 4)}


def run_state(environment: Environment) -> RunState:
    return environment.morph_run  # type: ignore[attr-defined]


@events.init.add_listener
def on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # e.g. imported by a tool, not run by Locust
        return
    try:
        targets = build_targets(
            split_list(options.grpc_target),
            split_list(options.rest_url) or [environment.host or ""],
            [] if options.no_token else split_list(options.key_file),
        )
    except TargetError as error:
        raise SystemExit(f"loadtest: {error}") from error
    profile = load_profile(options.request_profile, options.profiles_file)
    images, prompts = profile.inputs()
    schedule = StepSchedule.parse(options.stages, options.stage_seconds, options.max_seconds)
    # grpc's gevent integration and gevent's DNS resolver wait in the hub's thread pool (10
    # threads by default): with more calls in flight than threads, answers queue up inside this
    # process. One thread per possible user, plus slack.
    pool = gevent.get_hub().threadpool
    pool.maxsize = max(pool.maxsize, 2 * max(schedule.users) + 16)
    runner = environment.runner
    state = RunState(options, profile, images, prompts, schedule, targets,
                     worker_index=max(0, getattr(runner, "worker_index", 0)))
    environment.morph_run = state  # type: ignore[attr-defined]
    environment.events.request.add_listener(state.record)
    if isinstance(runner, MasterRunner):
        state.drain = Drain(expected=max(1, int(options.expect_workers)))
        runner.register_message("morph_abort", on_abort_message)
        runner.register_message("morph_drained", on_drained_message)
    elif isinstance(runner, WorkerRunner):
        runner.register_message("morph_drain", on_drain_message, concurrent=True)


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    state = run_state(environment)
    state.started_wall = time.time()
    state.loop_lag.start()
    samples = None if isinstance(environment.runner, MasterRunner) else \
        process_file(state.options.samples_file, environment.runner)
    if samples is not None:
        state.samples = open(samples, "w", buffering=1)  # noqa: SIM115


@events.test_stopping.add_listener
def on_test_stopping(environment: Environment, **_: Any) -> None:
    """Locust kills a user that is "waiting" at once, but with no think time that wait is a
    zero-length sleep: the kill lands after the user has already sent its next request, which
    then is neither answered nor lost. From here on users send nothing new (`MorphUser.begin`)."""
    run_state(environment).stopping = True


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    """Write the ledger and decide the exit code: refusals are an expected answer past
    capacity; any error, lost or unaccounted request fails the run."""
    state = run_state(environment)
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        # Locust rewrites its CSVs once per CSV_STATS_INTERVAL_SEC and only closes them at exit,
        # so requests that ended in the last interval (the drain after the last stage) would be
        # missing from run_stats.csv: give its writer one more turn before the files are closed.
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.5)
    state.loop_lag.stop()
    if state.samples is not None:
        state.samples.close()
        state.samples = None
    totals = state.ledger.totals()
    ledger_file = process_file(state.options.ledger_file, runner)
    if ledger_file is not None:
        role = {MasterRunner: "master", WorkerRunner: "worker"}.get(type(runner), "local")
        state.ledger.write(
            ledger_file,
            role=role,
            worker_index=state.worker_index if role == "worker" else None,
            started_wall=state.started_wall,
            stopped_wall=time.time(),
            profile=state.profile.to_dict(),
            schedule=state.schedule.to_dict(),
            targets=[target.name for target in state.targets],
            client_loop_lag=state.loop_lag.summary(),
            aborted=state.aborted,
            drain=state.drain.to_dict() if state.drain is not None else None,
        )
    bad = totals["error"] + totals["lost"] + totals["unaccounted"]
    if state.drain is not None and state.drain.timed_out:
        bad += 1
    logger.info("ledger: %s", totals)
    environment.process_exit_code = 1 if bad or state.aborted else 0


# ---------------------------------------------------------------------------- end of a run
@dataclass
class Drain:
    """The master's side of ending a distributed run (see the module docstring): ask every
    worker to stop sending once, then wait (bounded) until each has answered `morph_drained`."""

    expected: int  # workers the run was started with (--expect-workers)
    timeout_s: float = 0.0  # set at the first check: Locust's stop timeout + a margin
    started: float | None = None
    drained: dict[int, dict[str, Any]] = field(default_factory=dict)
    timed_out: bool = False
    seconds: float | None = None

    def finished(self, runner: MasterRunner) -> bool:
        now = time.monotonic()
        if self.started is None:
            self.started = now
            self.timeout_s = float(runner.environment.stop_timeout or 0.0) + 2 * WORKER_REPORT_INTERVAL + 30.0
            logger.info("schedule over: asking %d worker(s) to finish their requests", self.expected)
            runner.send_message("morph_drain")
        if len(self.drained) >= self.expected:
            self.seconds = round(now - self.started, 2)
            return True
        if now - self.started > self.timeout_s:
            self.timed_out, self.seconds = True, round(now - self.started, 2)
            logger.error("workers %s did not finish within %.0f s", sorted(self.drained), self.timeout_s)
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "drained": {str(k): v for k, v in sorted(self.drained.items())},
                "timed_out": self.timed_out, "seconds": self.seconds}


def abort_run(environment: Environment, reason: str) -> None:
    """Stop the whole run: this process sends nothing more, and the master (or, running alone,
    the shape) ends the schedule now."""
    state = run_state(environment)
    if state.aborted:
        return
    state.aborted, state.stopping = reason, True
    logger.error("stopping the run: %s", reason)
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.send_message("morph_abort", {"reason": reason, "worker": state.worker_index})


def on_abort_message(environment: Environment, msg: Any, **_: Any) -> None:
    state = run_state(environment)
    if not state.aborted:
        state.aborted = f"worker {msg.data.get('worker')}: {msg.data.get('reason')}"
        logger.error("stopping the run: %s", state.aborted)


def on_drained_message(environment: Environment, msg: Any, **_: Any) -> None:
    state = run_state(environment)
    if state.drain is not None:
        state.drain.drained[int(msg.data["worker"])] = msg.data


def on_drain_message(environment: Environment, **_: Any) -> None:
    """Worker: send nothing new, wait (bounded by the stop timeout) for the requests in flight,
    then one statistics report interval, so the master has every request before it quits."""
    state = run_state(environment)
    state.stopping = True
    started = time.monotonic()
    limit = float(environment.stop_timeout or 0.0)
    while state.ledger.in_flight() > 0 and time.monotonic() - started < limit:
        gevent.sleep(0.2)
    in_flight = state.ledger.in_flight()
    gevent.sleep(WORKER_REPORT_INTERVAL + 0.5)
    environment.runner.send_message("morph_drained", {
        "worker": state.worker_index, "in_flight": in_flight, "seconds": round(time.monotonic() - started, 2),
        "totals": state.ledger.totals(),
    })  # fmt: skip


# ---------------------------------------------------------------------------- load shape
class StepLoadShape(LoadTestShape):
    """Steps the user count along --stages (see loadtest/schedule.py); returning None at the
    hard limit ends the run. Running alone, in-flight requests then get --stop-timeout to finish;
    on a master, the workers drain first (`Drain`)."""

    last_tick: tuple[int, float] | None = None

    def tick(self) -> tuple[int, float] | None:
        state = run_state(self.runner.environment)
        users = None if state.aborted else state.schedule.users_at(self.get_run_time())
        if users is not None:
            self.last_tick = (users, SPAWN_RATE)
            return self.last_tick
        # Distributed: hold the last stage (new requests are refused by `stopping`) until every
        # worker has drained; then None makes the master quit.
        if state.drain is not None and self.last_tick is not None and not state.drain.finished(self.runner):
            return self.last_tick
        return None


# ---------------------------------------------------------------------------- users
class MorphUser(User):
    """Closed loop: one request in flight per user; `wait_time` is the think time or backoff."""

    abstract = True

    def on_start(self) -> None:
        self.run = run_state(self.environment)
        index = next(self.run.user_ids)
        self.target = self.run.targets[target_index(index, self.run.worker_index, len(self.run.targets))]
        self.rng = random.Random(f"{self.run.options.seed}:{type(self).__name__}:{index}")
        options = self.run.options
        self.backoff = Backoff(options.think_seconds, options.backoff_seconds, options.backoff_max_seconds, self.rng)

    def wait_time(self) -> float:
        return self.backoff.next_wait()

    def begin(self, mode: str) -> float:
        """Count a request as sent (or stop the user if the run is ending); its start time."""
        if self.run.stopping:
            raise StopUser()
        self.run.ledger.send(mode, self.target.name)
        return time.perf_counter()

    # ------------------------------------------------------------------ event helpers
    def fire(self, request_type: str, name: str, started: float, length: int = 0,
             exception: BaseException | None = None, *, ended: float | None = None) -> None:
        elapsed_ms = ((ended if ended is not None else time.perf_counter()) - started) * 1000.0
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=elapsed_ms, response_length=length,
            exception=exception, context={"users": self.environment.runner.user_count, "target": self.target.name},
        )  # fmt: skip

    def settle(self, request_type: str, mode: str, started: float, outcome: Outcome,
               message: str = "", length: int = 0, *, status: str | int | None = None) -> None:
        """Fire the request's Locust event under the series its outcome belongs to, count it
        (and its status: gRPC code name, HTTP status, None = no answer) in the ledger, set the
        backoff; an answer that every repetition would get too ends the run."""
        if outcome is Outcome.OK:
            self.fire(request_type, series(mode, "morph"), started, length)
        elif outcome is Outcome.BUSY:
            self.fire(request_type, series(mode, "busy"), started, length, ServerBusy(message))
        else:
            self.fire(request_type, series(mode, "morph"), started, length,
                      UnexpectedAnswer(f"{outcome.value}: {message}"))
        code = f"{'HTTP' if request_type == REST else request_type} {status if status is not None else 'no answer'}"
        self.run.ledger.settle(mode, outcome, self.target.name, code)
        self.backoff.answered(outcome)
        if outcome is Outcome.ERROR and refused_for_good(status):
            abort_run(self.environment, f"{self.target.name} refused a {mode} request: {message}")

    def observe_worker_time(self, header: dict[str, Any]) -> None:
        """The handler's own time for the morph (decode + morph + encode), as reported in the
        result: service time without queueing, for gRPC as well as REST."""
        total = (header.get("timings") or {}).get("total")
        if isinstance(total, (int, float)):
            now = time.perf_counter()
            self.fire(HANDLER, "morph time", now - float(total), ended=now)


def result_size(result: MorphResult) -> int:
    return sum(len(part.data) for part in result.parts) + sum(len(f) for f in result.streamed_frames)


def short(text: str, limit: int = 160) -> str:
    """Error text for Locust's failure table: one line, bounded (identical errors group)."""
    return " ".join(text.split())[:limit]


class GrpcMorphUser(MorphUser):
    """Unary Predictions and StreamPredictions over one channel per user."""

    weight = 2

    def on_start(self) -> None:
        super().on_start()
        options = self.run.options
        # retries=0: UNAVAILABLE is a result to measure here, not something to hide.
        self.client = MorphClient(self.target.grpc, options.model_name, tokens=self.run.tokens(self.target), retries=0)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def morph(self) -> None:
        if self.rng.random() < self.run.profile.stream_share:
            self.stream_morph()
        else:
            self.unary_morph()

    def unary_morph(self) -> None:
        profile = self.run.profile
        options = profile.request_options(self.rng)
        started = self.begin("unary")
        try:
            result = self.client.morph(self.run.images, self.run.prompts, options, deadline_s=profile.deadline_s)
        except MorphClientError as error:
            self.settle_error("unary", started, error)
            return
        self.settle(GRPC, "unary", started, Outcome.OK, length=result_size(result), status="OK")
        self.observe_worker_time(result.metadata)

    def stream_morph(self) -> None:
        profile = self.run.profile
        options = profile.request_options(self.rng)
        timer = FrameTimer(self)
        timer.started = started = self.begin("stream")
        try:
            result = self.client.morph_stream(
                self.run.images, self.run.prompts, options, deadline_s=profile.deadline_s, on_event=timer
            )
        except MorphClientError as error:
            self.settle_error("stream", started, error)
            return
        self.settle(GRPC, "stream", started, Outcome.OK, length=result_size(result), status="OK")
        self.observe_worker_time(result.metadata)

    def settle_error(self, mode: str, started: float, error: MorphClientError) -> None:
        code = error.code.name if error.code is not None else None
        outcome = classify_grpc(code, error.details, error.error_code) if code else Outcome.ERROR
        self.settle(GRPC, mode, started, outcome, short(f"{code or 'CLIENT'}: {error.details}"), status=code)


class FrameTimer:
    """`on_event` callback of a streamed morph: fires time-to-first-frame and the interval
    between consecutive frames as their own Locust entries."""

    def __init__(self, user: MorphUser) -> None:
        self.user = user
        self.started = time.perf_counter()
        self.last: float | None = None

    def __call__(self, message: wire.Message) -> None:
        if message.type != wire.TYPE_FRAME:
            return
        now = time.perf_counter()
        size = sum(len(part.data) for part in message.parts)
        if self.last is None:
            self.user.fire(GRPC, "stream first frame", self.started, size, ended=now)
        else:
            self.user.fire(GRPC, "stream frame interval", self.last, size, ended=now)
        self.last = now


class RestMorphUser(MorphUser):
    """POST multipart/form-data to /predictions/<model> (the same input map as gRPC), through
    the project's REST client (client.rest: standard library sockets, which Locust's gevent
    patching makes cooperative); a rejected token is re-read from the key file once."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.client = RestClient(self.target.rest_url, self.run.options.model_name, tokens=self.run.tokens(self.target))

    @task
    def predictions(self) -> None:
        profile = self.run.profile
        fields = build_input(self.run.images, self.run.prompts, profile.request_options(self.rng), stream=False)
        started = self.begin("predictions")
        try:
            answer = self.client.predict(fields, timeout_s=profile.deadline_s)
        except RestNoAnswer as error:
            self.settle(REST, "predictions", started, Outcome.LOST, short(f"{type(error).__name__}: {error}"))
            return
        outcome = classify_http(answer.status)
        if outcome is not Outcome.OK:
            self.settle(REST, "predictions", started, outcome, short(f"HTTP {answer.status}: {answer.text}"),
                        len(answer.body), status=answer.status)
            return
        try:
            message = answer.message()
        except wire.WireError as error:
            self.settle(REST, "predictions", started, Outcome.ERROR, short(f"bad body: {error}"), status=200)
            return
        self.settle(REST, "predictions", started, Outcome.OK, length=len(answer.body), status=200)
        self.observe_worker_time(message.header)
