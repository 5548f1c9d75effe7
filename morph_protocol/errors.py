"""Typed error codes: what went wrong, said once, for machines; the message says it for people.

A failed morph reaches a client through TorchServe, which passes only an HTTP status and a text
(`PredictionException(message, http_code)` becomes the gRPC details or the REST message) and maps
several statuses to one gRPC code (507 and 500 both become INTERNAL). So the worker ends its
message with a tag naming the code::

    invalid request: field 'image_1' is not a readable image (...) [diffmorpher:invalid_request]

`format_error` writes it and `parse_error` reads it back (TorchServe's Java class, appended after
the tag, is ignored). The tag is stable: the `diffmorpher:` prefix and the code values below never
change meaning; new codes may be added. The guard's gateway strips the tag and returns the code
as trailing metadata (`ERROR_CODE_METADATA`) beside clean details; the client reads either.
Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .torchserve import clean_details

# The gRPC trailing metadata key under which the gateway returns the code (value: ErrorCode).
ERROR_CODE_METADATA = "diffmorpher-error-code"
TAG_PREFIX = "diffmorpher:"
_TAG = re.compile(r"\s*\[" + re.escape(TAG_PREFIX) + r"([a-z_]+)\]\s*$")


class ErrorCode(StrEnum):
    """Why a call failed. Values are the tag's and the metadata's text, and the worker's
    MorphRejected metric `Reason` dimension."""

    # The worker's (the handler raises them).
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"  # an image reference the cache no longer holds (gateway: an unknown model)
    TOO_LARGE = "too_large"  # the result exceeds max_response_size
    CANCELLED = "cancelled"  # the client went away; the gateway marked the call
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"
    # The gateway's (said by TorchServe's frontend in its own words, or by no one).
    # every worker busy and the job queue full; from a worker: another worker's fit of the same
    # image outlasted the cache's last-resort wait (diffmorpher.cache.CacheWaitTimeout): retry with backoff
    BUSY = "busy"
    WORKER_DIED = "worker_died"  # the worker process died mid-morph; a new one is starting
    UNREACHABLE = "unreachable"  # the model server is not reachable (starting, restarting)

    @property
    def http_status(self) -> int:
        return _STATUS[self].http

    @property
    def grpc_status(self) -> str:
        """The grpc.StatusCode name a client sees from the gateway."""
        return _STATUS[self].grpc

    @property
    def retryable(self) -> bool:
        """True where the same request may succeed later unchanged."""
        return self in (ErrorCode.BUSY, ErrorCode.WORKER_DIED, ErrorCode.UNREACHABLE)


@dataclass(frozen=True)
class _Status:
    http: int
    grpc: str


# HTTP status: what the worker hands TorchServe (which maps 400 INVALID_ARGUMENT, 404 NOT_FOUND,
# 413 RESOURCE_EXHAUSTED, 499 CANCELLED, 504 DEADLINE_EXCEEDED, other 5xx INTERNAL). gRPC: what
# the gateway answers (507's INTERNAL becomes RESOURCE_EXHAUSTED there).
_STATUS: dict[ErrorCode, _Status] = {
    ErrorCode.INVALID_REQUEST: _Status(400, "INVALID_ARGUMENT"),
    ErrorCode.NOT_FOUND: _Status(404, "NOT_FOUND"),
    ErrorCode.TOO_LARGE: _Status(413, "RESOURCE_EXHAUSTED"),
    ErrorCode.CANCELLED: _Status(499, "CANCELLED"),
    ErrorCode.DEADLINE_EXCEEDED: _Status(504, "DEADLINE_EXCEEDED"),
    ErrorCode.OUT_OF_MEMORY: _Status(507, "RESOURCE_EXHAUSTED"),
    # 500, not TorchServe's default 503: a deterministic failure must not be retried.
    ErrorCode.INTERNAL: _Status(500, "INTERNAL"),
    ErrorCode.BUSY: _Status(503, "UNAVAILABLE"),
    ErrorCode.WORKER_DIED: _Status(500, "ABORTED"),
    ErrorCode.UNREACHABLE: _Status(503, "UNAVAILABLE"),
}


def format_error(code: ErrorCode, message: str) -> str:
    """`message` with its code's tag at the end, where TorchServe leaves it (it only appends)."""
    return f"{message} [{TAG_PREFIX}{code.value}]"


def parse_error(details: str) -> tuple[ErrorCode | None, str]:
    """The code a message's tag names, and the message for people (no tag, no Java class).
    (None, message) for an untagged message or a code this version does not know."""
    text = clean_details(details)
    match = _TAG.search(text)
    if match is None:
        return None, text
    message = text[: match.start()].rstrip()
    try:
        return ErrorCode(match.group(1)), message
    except ValueError:
        return None, message
