"""A real TorchServe on free loopback ports, for end-to-end tests (and load tests).

Its config is the repository's config.properties with only the addresses, ports, model store
and file paths replaced, so tests exercise the shipped settings (token auth on, model API off,
size limits). It runs in its own directory (key_file.json and logs land there), with its own
TMPDIR (TorchServe's pid file) and worker port (the worker's unix socket name), so it never
collides with a `make serve` on the same box. It is started in the foreground in a new process
group and stopped by signalling that group only: the Java frontend and its Python workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from morph_protocol.management import ManagementApi, ManagementError, WorkerLoadError, WorkerLoadTimeout, log_size, wait_for_worker
from morph_protocol.properties import replace_properties

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "config.properties"


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class TorchServeProcess:
    workdir: Path
    model_store: Path
    model_name: str = "diffmorpher"
    archive: str = "diffmorpher.mar"
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    guard: bool = True  # run the guard (gateway, watchdog, tokens, health) beside TorchServe
    guard_args: tuple[str, ...] = ("--interval", "1")
    overrides: dict[str, str] = field(default_factory=dict)  # more config.properties settings
    env: dict[str, str] = field(default_factory=dict)  # more environment for TorchServe and its workers
    guard_process: subprocess.Popen | None = None
    log_offset: int = 0  # the model log's size when this start began: older deaths are not ours

    # ------------------------------------------------------------------ config
    def write_config(self) -> Path:
        names = ("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker",
                 "gateway", "health")
        self.ports = dict(zip(names, free_ports(len(names))))
        overrides = {
            "inference_address": f"http://127.0.0.1:{self.ports['inference']}",
            "management_address": f"http://127.0.0.1:{self.ports['management']}",
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "initial_worker_port": str(self.ports["worker"]),
            "model_store": str(self.model_store),
            "load_models": f"{self.model_name}={self.archive}",
            "metrics_config": str(REPO_ROOT / "handler" / "metrics.yaml"),
            "diffmorpher.gateway_address": f"127.0.0.1:{self.ports['gateway']}",
            "diffmorpher.health_address": f"127.0.0.1:{self.ports['health']}",
            **self.overrides,
        }
        text, missing = replace_properties(BASE_CONFIG.read_text(), overrides)
        path = self.workdir / "config.properties"
        path.write_text(text + "".join(f"{key}={value}\n" for key, value in missing.items()))
        return path

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 300.0, wait: bool = True) -> "TorchServeProcess":
        """Start TorchServe (and the guard); with `wait`, return once the worker is READY, else
        at once (the guard then only has to answer /status)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        config = self.write_config()
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            # One torch thread per worker: the test process, the worker and Locust share two
            # cores, and oversubscribed OpenMP threads were measured 10x slower.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DIFFMORPHER_CONTROL_DIR": str(self.control_dir),
            "DIFFMORPHER_CACHE_DIR": str(self.cache_dir),
            **self.env,
        }
        command = [
            str(Path(sys.executable).with_name("torchserve")),
            "--start", "--foreground", "--ncs",
            "--ts-config", str(config),
            "--model-store", str(self.model_store),
        ]  # fmt: skip
        self.log_offset = log_size(self.model_log)
        self.process = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=env,
            stdout=open(self.workdir / "torchserve.out", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals exactly this tree
        )
        try:
            if wait:
                self.wait_ready(timeout_s)
            if self.guard:
                self.start_guard(config, env, "/healthz" if wait else "/status")
        except BaseException:
            self.stop()
            raise
        return self

    def start_guard(self, config: Path, env: dict[str, str], ready_path: str = "/healthz") -> None:
        command = [
            sys.executable, "-m", "guard", "--ts-config", str(config), "--key-file", str(self.key_file),
            "--model", self.model_name, *self.guard_args,
        ]  # fmt: skip
        self.guard_process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=open(self.workdir / "guard.out", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.guard_process.poll() is not None:
                raise RuntimeError(f"the guard exited:\n{(self.workdir / 'guard.out').read_text()}")
            try:
                if self.health(ready_path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the guard did not report healthy:\n{(self.workdir / 'guard.out').read_text()}")

    def wait_ready(self, timeout_s: float) -> None:
        """Until the model's worker is READY: morph_protocol.management's wait (the one `make
        serve` runs), failing at once when TorchServe exits or the worker dies loading."""
        def alive() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                return f"TorchServe exited with {self.process.returncode}"
            return None

        try:
            wait_for_worker(self.management_api(), self.model_name, timeout_s, model_log=self.model_log,
                            log_offset=self.log_offset, alive=alive)
        except WorkerLoadTimeout as error:
            raise TimeoutError(f"{error}:\n{self.log_tail()}") from error
        except WorkerLoadError as error:
            raise RuntimeError(f"{error}:\n{self.log_tail()}") from error

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.guard_process is not None:
            self.guard_process.terminate()
            try:
                self.guard_process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.guard_process.kill()
            self.guard_process = None
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout_s)
                # The frontend exits before its workers: make sure the group is gone too.
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def __enter__(self) -> "TorchServeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def key(self, api: str = "inference") -> str:
        return json.loads(self.key_file.read_text())[api]["key"]

    @property
    def control_dir(self) -> Path:
        return self.workdir / "control"

    @property
    def cache_dir(self) -> Path:
        """The LoRA/latent cache all workers of this server share."""
        return self.workdir / "cache"

    @property
    def grpc_target(self) -> str:
        """Where clients go: the guard's gateway, or TorchServe itself without a guard."""
        return f"127.0.0.1:{self.ports['gateway' if self.guard else 'grpc_inference']}"

    @property
    def direct_grpc_target(self) -> str:
        """TorchServe's own gRPC port, bypassing the gateway (what a misconfigured or hostile
        client on the host could reach)."""
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    def health(self, path: str = "/healthz") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url("health", path), timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def url(self, api: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

    def management_api(self) -> ManagementApi:
        tokens = self.overrides.get("disable_token_authorization", "false") != "true"
        return ManagementApi(self.url("management", ""), self.key_file if tokens else None)

    @property
    def model_log(self) -> Path:
        return self.workdir / "logs" / "model_log.log"

    def describe(self) -> dict:
        """The model's description; OSError when the management API does not answer."""
        try:
            return self.management_api().describe(self.model_name)
        except ManagementError as error:
            raise OSError(str(error)) from error

    def worker_status(self) -> str:
        return self.describe()["workers"][0]["status"]

    def worker_pid(self) -> int:
        return int(self.describe()["workers"][0]["pid"])

    def worker_pids(self) -> list[int]:
        return sorted(int(w["pid"]) for w in self.describe()["workers"])

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        for name in ("torchserve.out", "guard.out", "logs/model_log.log", "logs/ts_log.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)
