"""The guard process: gateway + watchdog + token rotation + health endpoint, in one process.

Health endpoint (HTTP, for a load balancer or Kubernetes probes):
  GET /healthz  readiness: 200 while every worker is alive and making progress, else 503 with
                the reasons (a worker is dead or wedged, requests wait while no worker makes
                progress - the watchdog's "stalled" rule, seconds -, fewer workers than
                minWorkers, TorchServe silent, or client tokens are on and none is usable)
  GET /livez    liveness: 503 only when the service has been unhealthy for `liveness_grace_s`
                despite repairs (restart the pod then)
  GET /status   200 always: the last report, repairs with their durations, token rotations
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .gateway import Gateway
from .tokens import TokenRotator
from .watchdog import Watchdog

logger = logging.getLogger(__name__)


@dataclass
class Guard:
    gateway: Gateway | None
    watchdog: Watchdog
    rotator: TokenRotator | None
    health_address: tuple[str, int]
    liveness_grace_s: float = 300.0
    unhealthy_since: float | None = None

    def status(self) -> dict[str, Any]:
        report = self.watchdog.report
        reasons = list(report.reasons)
        auth = self.gateway.admission.status() if self.gateway else {}
        if auth.get("valid_tokens") == 0:  # it would refuse every client: out of the Service
            reasons.append(f"no usable client token: {'; '.join(auth.get('problems', []))}")
        return {
            "healthy": report.healthy and not reasons,
            "reasons": reasons,
            "checked": report.checked,
            "requests_waiting": report.pending,
            "workers": [
                {key: worker.get(key) for key in ("id", "pid", "status", "startTime")} for worker in report.workers
            ],
            "repairs": [{**asdict(e), "seconds": e.seconds} for e in self.watchdog.events],
            "token_rotations": self.rotator.rotations if self.rotator else {},
            "token_error": self.rotator.last_error if self.rotator else "",
            "calls_cancelled": self.gateway.calls_cancelled if self.gateway else 0,
            "client_auth": auth,
        }

    def live(self, now: float) -> bool:
        return self.unhealthy_since is None or now - self.unhealthy_since < self.liveness_grace_s

    # ------------------------------------------------------------------ loop
    def tick(self, now: float) -> None:
        if self.rotator is not None:
            self.rotator.rotate_due(now)
        report = self.watchdog.check(now)
        if report.healthy:
            self.unhealthy_since = None
        elif self.unhealthy_since is None:
            self.unhealthy_since = now

    def run(self, stop: threading.Event) -> None:
        server = self.gateway.server() if self.gateway else None
        if server is not None:
            server.start()
        health = ThreadingHTTPServer(self.health_address, _health_handler(self))
        threading.Thread(target=health.serve_forever, name="health", daemon=True).start()
        logger.info("guard running: health on http://%s:%d", *health.server_address[:2])
        try:
            while not stop.is_set():
                try:
                    self.tick(time.time())
                except Exception:  # noqa: BLE001 - the guard must outlive any one bad round
                    logger.exception("guard round failed")
                stop.wait(self.watchdog.config.interval_s)
        finally:
            health.shutdown()
            if server is not None:
                server.stop(grace=5).wait()


def _health_handler(guard: Guard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            status = guard.status()
            if self.path == "/healthz":
                code = 200 if status["healthy"] else 503
            elif self.path == "/livez":
                code = 200 if guard.live(time.time()) else 503
            elif self.path == "/status":
                code = 200
            else:
                code, status = 404, {"error": "unknown path; use /healthz, /livez or /status"}
            body = json.dumps(status).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet probes
            return

    return Handler
