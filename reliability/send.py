"""Sending one corpus case over one transport to a real server, and judging the answer.

Used by the corpus test and the soak; grpcio + the standard library only (no torch). Transports:
`unary` (gRPC Predictions), `stream` (gRPC StreamPredictions), `rest` (multipart/form-data POST,
through the project's REST client, client.rest, which sends any field map as it is).
A case's `token` is "valid" (the server's current inference key, re-read from its key file, and
once more after PERMISSION_DENIED as clients do), None (no token) or "wrong".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from client.rest import RestClient, RestNoAnswer, token_refused
from grpc_api import stubs

from morph_protocol import limits, wire
from morph_protocol.keyfile import TokenSource

from .corpus import INVALID, OK, TOO_LARGE, UNAUTHENTICATED, Case

GRPC_CODES = {OK: "OK", INVALID: "INVALID_ARGUMENT", TOO_LARGE: "RESOURCE_EXHAUSTED",
              UNAUTHENTICATED: "PERMISSION_DENIED"}
# TorchServe's HTTP server answers an oversized body with 413 and closes the connection while
# the client is still uploading; a client that does not read the early answer sees the close.
CLOSED = 0
HTTP_CODES = {OK: (200,), INVALID: (400,), TOO_LARGE: (413, CLOSED), UNAUTHENTICATED: (400, 401, 403)}
# Above every limit of the server (the largest case is a request just over MAX_REQUEST_BYTES;
# a result may be MAX_RESPONSE_BYTES plus framing), so the server refuses, never this sender.
MAX_MESSAGE_BYTES = 2 * max(limits.MAX_REQUEST_BYTES, limits.MAX_RESPONSE_BYTES + limits.RESPONSE_FRAMING_BYTES)


@dataclass(frozen=True)
class Endpoints:
    grpc_target: str
    rest_url: str  # http://host:port of TorchServe's inference API
    key_file: Path
    model: str = "diffmorpher"


@dataclass
class Answer:
    """What came back: a gRPC code name or HTTP status, the message, the final header if any."""

    transport: str
    code: str
    message: str
    seconds: float
    header: dict[str, Any] | None = None
    token_retries: int = 0


class Sender:
    """One gRPC channel and the key file's token, reused across cases."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.tokens = TokenSource(key_file=endpoints.key_file)
        pb2, pb2_grpc = stubs.load()
        self.pb2 = pb2
        self.channel = grpc.insecure_channel(
            endpoints.grpc_target,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.rest = RestClient(endpoints.rest_url, endpoints.model)

    def close(self) -> None:
        self.channel.close()

    def _token(self, kind: str | None) -> str | None:
        return {"valid": self.tokens.get(), None: None}.get(kind, "wrong-token")

    def send(self, case: Case, transport: str, timeout_s: float = 300.0) -> Answer:
        """Send `case`; with a valid token, a PERMISSION_DENIED caused by a key rotation in
        between is retried once with the re-read key (what clients do)."""
        answer = self._send_once(case, transport, timeout_s)
        denied = answer.code == "PERMISSION_DENIED" or (
            answer.code.isdigit() and token_refused(int(answer.code), answer.message)
        )
        if case.token == "valid" and denied and self.tokens.refresh():
            answer = self._send_once(case, transport, timeout_s)
            answer.token_retries = 1
        return answer

    def _send_once(self, case: Case, transport: str, timeout_s: float) -> Answer:
        started = time.perf_counter()
        token = self._token(case.token)
        if transport == "rest":
            status, body = rest_send(self.rest, case.fields, token, timeout_s)
            header, message = _decode(body) if status == 200 else (None, body.decode("utf-8", "replace"))
            return Answer(transport, str(status), message, time.perf_counter() - started, header)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        request = self.pb2.PredictionsRequest(model_name=self.endpoints.model, input=case.fields)
        try:
            if transport == "unary":
                response = self.stub.Predictions(request, timeout=timeout_s, metadata=metadata)
                last = response.prediction
            else:
                last = b""
                for response in self.stub.StreamPredictions(request, timeout=timeout_s, metadata=metadata):
                    last = response.prediction
        except grpc.RpcError as error:
            return Answer(transport, error.code().name, error.details() or "", time.perf_counter() - started)
        header, message = _decode(last)
        return Answer(transport, "OK", message, time.perf_counter() - started, header)


def _decode(payload: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        message = wire.decode_message(payload)
    except wire.WireError as error:
        return None, f"undecodable answer: {error}"
    return message.header, message.type


def judge(case: Case, answer: Answer) -> str | None:
    """None when the answer is what the case expects, else what is wrong (for the test report)."""
    if answer.transport == "rest":
        expected_ok = int(answer.code) in HTTP_CODES[case.expect] if answer.code.isdigit() else False
    else:
        expected_ok = answer.code == GRPC_CODES[case.expect]
    if not expected_ok:
        return f"expected {case.expect}, got {answer.code}: {answer.message[:300]!r}"
    if case.expect == OK:
        if answer.header is None or answer.header.get("type") != wire.TYPE_RESULT:
            return f"a success that is not a result message: {answer.message[:200]!r}"
        return None
    if case.message and case.message not in answer.message:
        return f"message lacks {case.message!r}: {answer.message[:300]!r}"
    if answer.transport != "rest" and "org.pytorch.serve" in answer.message:
        return f"message carries TorchServe's Java class: {answer.message[:300]!r}"
    return None


def rest_send(client: RestClient, fields: dict[str, bytes], token: str | None,
              timeout_s: float) -> tuple[int, bytes]:
    """One POST of `fields` as they are; a connection the server closed without an answer (an
    oversized body refused mid-upload) is status CLOSED with what happened as the body."""
    try:
        answer = client.post_fields(fields, token=token, timeout_s=timeout_s)
    except RestNoAnswer as error:
        if error.closed:
            return CLOSED, str(error).encode()
        raise
    return answer.status, answer.body
