"""TorchServe's management API (describe, scale, rotate tokens) and the one wait for a model's
worker to be READY that `make serve` (the client's `wait --model-ready`), the test launcher and
the guard share (standard library only). Its config.properties is read by
morph_protocol.properties.

TorchServe 0.12 reports a worker that is still loading and one whose load failed alike (status
"UNLOADING" until the model is loaded): only the model log tells them apart. Each failed load
writes the worker's Python traceback and "Backend worker process died." to logs/model_log.log,
and TorchServe then retries with a growing back-off, forever. The wait reads the log written
since it began and fails at the first death with the traceback's last line (the error), instead
of waiting out its timeout.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .keyfile import TokenError, read_key_file

READY = "READY"
WORKER_DIED = "Backend worker process died."
NOT_REGISTERED_S = 30.0  # a 404 this long after the start is a missing model, not a slow start
_MODEL_LOG_PREFIX = re.compile(r"^.*? MODEL_LOG - ")
_WORKER_START = ("Listening on port", "Torch worker started")
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure)\b.*")


class ManagementError(RuntimeError):
    """The management API did not answer as expected."""


class WorkerLoadError(RuntimeError):
    """The model's worker died while loading, or did not load in time; the message says why."""


class WorkerLoadTimeout(WorkerLoadError, TimeoutError):
    """No worker READY within the wait's timeout (and none died)."""


@dataclass
class ManagementApi:
    url: str  # e.g. http://127.0.0.1:8081
    # TorchServe's key_file.json (management and API keys); None where the server runs with
    # disable_token_authorization=true: it then writes no key file and wants no header.
    key_file: Path | None
    timeout_s: float = 10.0

    def _request(self, method: str, path: str, key: str | None, timeout_s: float | None = None) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        request = urllib.request.Request(self.url.rstrip("/") + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise ManagementError(f"{method} {path}: HTTP {error.code}: {error.read()[:300]!r}") from error
        except (urllib.error.URLError, OSError) as error:
            raise ManagementError(f"{method} {path}: {error}") from error
        try:
            return json.loads(body) if body.strip() else {}
        except json.JSONDecodeError:
            return {"text": body.decode("utf-8", "replace")}

    def _key(self, api: str) -> str | None:
        if self.key_file is None:
            return None
        try:
            return read_key_file(self.key_file, api)
        except TokenError as error:  # e.g. TorchServe has not written the file yet
            raise ManagementError(str(error)) from error

    def _management(self, method: str, path: str, timeout_s: float | None = None) -> Any:
        return self._request(method, path, self._key("management"), timeout_s)

    def describe(self, model: str) -> dict[str, Any]:
        answer = self._management("GET", f"/models/{urllib.parse.quote(model)}")
        if not isinstance(answer, list) or not answer:
            raise ManagementError(f"unexpected describe answer for {model}: {str(answer)[:200]}")
        return answer[0]

    def worker_statuses(self, model: str) -> list[str]:
        """Each worker's status ("READY", "BUSY", "UNLOADING" while loading, ...)."""
        return [str(worker.get("status", "")) for worker in self.describe(model).get("workers", [])]

    def scale(self, model: str, min_workers: int, timeout_s: float = 120.0) -> None:
        """Synchronous: returns when TorchServe has started or stopped the workers."""
        query = urllib.parse.urlencode({"min_worker": min_workers, "synchronous": "true"})
        self._management("PUT", f"/models/{urllib.parse.quote(model)}?{query}", timeout_s)

    def rotate_token(self, kind: str) -> None:
        """Ask TorchServe for a new `kind` ("management" or "inference") key; it rewrites the key
        file. Authorised by the API key, which does not expire."""
        self._request("POST", f"/token?type={kind}", self._key("API"))


def log_size(path: Path | None) -> int:
    """Where a wait should start reading a log: its current size (0 when absent)."""
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def worker_death(model_log: Path, offset: int = 0) -> str | None:
    """The reason of the first worker death written to `model_log` after `offset`: the last
    error line of that worker's output (its traceback follows "Backend worker process died."
    in the log, up to the next worker's start), or the marker itself; None while no worker died."""
    try:
        with open(model_log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [_MODEL_LOG_PREFIX.sub("", line).strip() for line in text.splitlines()]
    if WORKER_DIED not in lines:
        return None
    died = lines.index(WORKER_DIED)
    starts = [i for i, line in enumerate(lines) if line.startswith(_WORKER_START)]
    first = max([i for i in starts if i < died], default=0)
    last = min([i for i in starts if i > died], default=len(lines))
    errors = [line for line in lines[first:last] if _ERROR_LINE.match(line)]
    return errors[-1] if errors else WORKER_DIED


def wait_for_worker(
    api: ManagementApi,
    model: str,
    timeout_s: float,
    *,
    model_log: Path | None = None,
    log_offset: int = 0,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 5.0,
    alive: Callable[[], str | None] | None = None,
    poll_s: float = 0.5,
) -> float:
    """Wait until a worker of `model` is READY (the management API); returns the seconds waited.

    Raises WorkerLoadError at once when the model log (read from `log_offset`) shows a worker
    death, with its error; when `alive` (a check of the server process) returns a reason; or
    after `timeout_s` with the last status and the log's last error. `progress` gets a line
    every `progress_every_s`: "waiting for worker: loading (12 s)".
    """
    started = time.monotonic()
    next_report = started + progress_every_s
    state = "no answer"
    while True:
        elapsed = time.monotonic() - started
        try:
            statuses = api.worker_statuses(model)
            if READY in statuses:
                return elapsed
            state = "loading" if statuses else "no worker yet"
        except ManagementError as error:
            if "HTTP 404" in str(error):  # TorchServe answers but has no such model (load_models?)
                state = f"model {model} not registered"
                if elapsed >= NOT_REGISTERED_S:
                    raise WorkerLoadError(f"TorchServe has no model {model} after {elapsed:.0f} s "
                                          f"(load_models / model_store?): {str(error)[:200]}") from error
            else:
                state = f"management API not answering ({str(error)[:80]})"
        if model_log is not None and (reason := worker_death(model_log, log_offset)) is not None:
            time.sleep(1.0)  # the traceback follows the death's line: let it be written
            reason = worker_death(model_log, log_offset) or reason
            raise WorkerLoadError(f"the worker of {model} died while loading: {reason} (log: {model_log})")
        if alive is not None and (reason := alive()) is not None:
            raise WorkerLoadError(f"{reason} while the worker of {model} was {state}")
        if elapsed >= timeout_s:
            raise WorkerLoadTimeout(f"the worker of {model} was not READY after {timeout_s:.0f} s: {state}"
                                  + (f" (log: {model_log})" if model_log is not None else ""))
        if progress is not None and time.monotonic() >= next_report:
            progress(f"waiting for worker: {state} ({elapsed:.0f} s)")
            next_report += progress_every_s
        time.sleep(poll_s)
