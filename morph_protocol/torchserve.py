"""What TorchServe 0.12's Java frontend says, in the words it says it.

The frontend's own refusals (a full queue, a dead worker) reach the gateway and the client as
gRPC statuses whose text is the only thing that tells them apart from a morph's failure, and it
appends its Java exception class to every message. Those texts are TorchServe's, not ours: they
are recognised here, in one place, and nowhere else. Our own errors never need this: they carry
a typed code (morph_protocol.errors).
"""

from __future__ import annotations

import re

# A full job queue ("Model ... has no worker to serve inference request. Please use scale workers
# API to add workers."), answered as INTERNAL (gRPC) or 503 (REST).
BUSY_MESSAGE = "has no worker to serve inference request"
# A REST request whose bearer token TorchServe refused (wrong, expired or missing): HTTP 400 with
# "Token Authorization failed. Token either incorrect, expired, or not provided correctly".
TOKEN_REFUSED = "Token Authorization failed"
# The worker process running the job died (exit 137, i.e. SIGKILL, is reported as 413
# RESOURCE_EXHAUSTED, anything else as INTERNAL).
WORKER_DIED = "Worker died."
# The Open Inference Protocol service's own refusals (all INTERNAL in 0.12): an unknown model
# ("Model not found: ..."), a missing request field ("Parameter model_name is required."), and
# the whole service when TorchServe runs without ts_open_inference_protocol=true (UNIMPLEMENTED).
OIP_MODEL_NOT_FOUND = "Model not found"
_OIP_PARAMETER_REQUIRED = re.compile(r"^Parameter \S+ is required\b")
OIP_METHOD_NOT_FOUND = "Method not found"
# TorchServe appends its Java exception class to every gRPC error message.
_JAVA_SUFFIX = re.compile(r"\s*\n?org\.pytorch\.serve\.[A-Za-z0-9_.]+\s*$")


def clean_details(details: str) -> str:
    """A server's error message without TorchServe's Java exception class."""
    return _JAVA_SUFFIX.sub("", details or "").strip()


def is_busy_message(details: str) -> bool:
    """True for the frontend's full-queue refusal."""
    return BUSY_MESSAGE in details


def is_worker_died(details: str) -> bool:
    """True for the frontend's answer when the job's worker process died."""
    return clean_details(details) == WORKER_DIED


def is_oip_model_not_found(details: str) -> bool:
    """True for the OIP service's answer for a model it does not serve."""
    return clean_details(details).startswith(OIP_MODEL_NOT_FOUND)


def is_oip_parameter_required(details: str) -> bool:
    """True for the OIP service's refusal of a request without a field it needs."""
    return _OIP_PARAMETER_REQUIRED.match(clean_details(details)) is not None


def is_method_not_found(details: str) -> bool:
    """True when the frontend does not serve the called RPC (e.g. OIP switched off)."""
    return OIP_METHOD_NOT_FOUND in details
