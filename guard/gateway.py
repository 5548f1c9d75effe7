"""The public gRPC endpoint: TorchServe's InferenceAPIsService, proxied, with what 0.12 lacks.

TorchServe 0.12's frontend cannot tell its Python worker which RPC a request came on, cannot
tell it that the client went away, and appends its Java exception class to every error message.
The gateway sits in front of TorchServe's (loopback-only) gRPC port and, per call:

- refuses `stream` on a unary Predictions call (INVALID_ARGUMENT) and sets it on every
  StreamPredictions call: a worker streaming into a unary call dies while TorchServe still
  reports it READY (the "unary/stream trap"), and a StreamPredictions call answered without any
  intermediate message kills the worker too; no client can cause either through the gateway;
- turns the gRPC deadline into the request's `deadline` field (on this server's clock) and gives
  the call a `call_id`; when the call ends without an answer (cancelled, deadline passed) it
  writes the call's cancellation marker (morph_protocol.control), which stops the morph within a step;
- returns errors without the Java class or the worker's code tag, the code as trailing
  metadata (`diffmorpher-error-code`, morph_protocol.errors), the queue-full refusal as
  UNAVAILABLE "server busy", out-of-memory as RESOURCE_EXHAUSTED, and a worker that died
  mid-morph as ABORTED with a message saying what happened (TorchServe: "Worker died.", as
  INTERNAL or RESOURCE_EXHAUSTED).
It also serves the Open Inference Protocol (KServe v2) as `inference.GRPCInferenceService`, the
name KServe v2 clients call, forwarding each method to the same service inside TorchServe
(`ts_open_inference_protocol=true`, another package name); ModelInfer gets the same deadline,
call_id, cancel marker and error mapping, and guard/oip.py adapts what TorchServe drops or encodes
its own way (raw contents, parameters, BYTES outputs). A ModelInfer call to TorchServe is never
cancelled by the gateway: TorchServe 0.12 restarts the worker when an OIP job's error meets a
closed call, so the worker, stopped by the deadline or cancel marker, ends it.
Who may call: by default only the `authorization` metadata is forwarded and TorchServe checks
the token; with client tokens (guard/client_auth.py) the gateway checks the client's token
itself and calls TorchServe with its own key, retried once with the renewed key when TorchServe
refused it mid-rotation (before any work ran: TorchServe checks the key first).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Iterator

import grpc
from google.protobuf import empty_pb2

from grpc_api import stubs

from morph_protocol import limits, properties, torchserve, wire
from morph_protocol.errors import ERROR_CODE_METADATA, ErrorCode, parse_error

from grpc_api import oip_proto
from morph_protocol import oip as oip_names

from . import oip
from .client_auth import UPSTREAM_KEY_REFUSED, Admission, PassThrough
from morph_protocol.control import ControlDir

logger = logging.getLogger(__name__)

BUSY_DETAILS = (
    "server busy: every worker is busy and the job queue is full (TorchServe: model has no worker "
    "to serve inference request); retry with backoff"
)
WORKER_DIED_DETAILS = (
    "the worker running this morph died (killed, e.g. by the kernel's out-of-memory killer or the "
    "guard's watchdog, or crashed); a new worker is starting. Retry; if it happens again, ask for "
    "a smaller frame_batch_size or vae_batch_size, fewer images or a lower resolution"
)
NO_DEADLINE_S = 10**8  # grpcio reports "no deadline" as a huge time_remaining()
# How long a ModelInfer call to TorchServe may outlive its client's deadline. TorchServe 0.12
# answers an OIP job whose call has ended with onError on the closed call, which throws in the
# worker's thread and restarts the worker ("call already closed"); so the gateway never ends that
# call itself: the worker stops the job at its deadline or cancel marker, within a step, and
# answers the still-open call. The same bound as the watchdog's default --wedge-after.
OIP_UPSTREAM_GRACE_S = 600.0


@dataclass(frozen=True)
class GatewayConfig:
    listen: str  # host:port of the public gRPC endpoint
    upstream: str  # TorchServe's gRPC inference address (loopback)
    max_request_bytes: int = limits.MAX_REQUEST_BYTES  # config.properties max_request_size
    max_response_bytes: int = limits.MAX_RESPONSE_BYTES + limits.RESPONSE_FRAMING_BYTES  # max_response_size + framing
    max_concurrent_calls: int = 256

    @classmethod
    def from_properties(cls, listen: str, upstream: str, props: dict[str, str]) -> "GatewayConfig":
        """The limits TorchServe runs with (config.properties), so the gateway refuses what it would."""
        return cls(listen, upstream, max_request_bytes=properties.max_request_bytes(props),
                   max_response_bytes=properties.max_response_bytes(props) + limits.RESPONSE_FRAMING_BYTES)


@dataclass(frozen=True)
class ClientError:
    """What the gateway answers for a failed upstream call: status, details for people (no Java
    class, no tag) and the typed code (None where neither the worker nor TorchServe said one)."""

    status: grpc.StatusCode
    details: str
    code: ErrorCode | None = None

    def abort(self, context: grpc.ServicerContext) -> None:
        """End the call with this error, the code as trailing metadata."""
        _abort_with(context, self.status, self.details, self.code)


def translate_error(status: grpc.StatusCode, details: str) -> ClientError:
    """What a client should see for an upstream error. The worker's own errors carry their code
    (errors.parse_error), and the status is the code's (507's INTERNAL becomes
    RESOURCE_EXHAUSTED); TorchServe's own refusals are known by their words
    (morph_protocol.torchserve) and get a code and a message saying what to do."""
    code, message = parse_error(details)
    if code is not None:
        return ClientError(getattr(grpc.StatusCode, code.grpc_status), message, code)
    if torchserve.is_worker_died(message):
        return ClientError(grpc.StatusCode.ABORTED, WORKER_DIED_DETAILS, ErrorCode.WORKER_DIED)
    if status == grpc.StatusCode.INTERNAL and torchserve.is_busy_message(message):
        return ClientError(grpc.StatusCode.UNAVAILABLE, BUSY_DETAILS, ErrorCode.BUSY)
    if status == grpc.StatusCode.UNAVAILABLE:
        return ClientError(status, f"the model server is not reachable (starting or restarting); retry: {message}",
                           ErrorCode.UNREACHABLE)
    return ClientError(status, message)


def translate_oip_error(status: grpc.StatusCode, details: str) -> ClientError:
    """As translate_error, plus what TorchServe's OIP service answers its own way."""
    error = translate_error(status, details)
    if error.code is not None:
        return error
    if status == grpc.StatusCode.INTERNAL and torchserve.is_oip_model_not_found(error.details):
        return ClientError(grpc.StatusCode.NOT_FOUND, error.details, ErrorCode.NOT_FOUND)
    if status == grpc.StatusCode.INTERNAL and torchserve.is_oip_parameter_required(error.details):
        return ClientError(grpc.StatusCode.INVALID_ARGUMENT, error.details, ErrorCode.INVALID_REQUEST)
    if status == grpc.StatusCode.UNIMPLEMENTED and torchserve.is_method_not_found(error.details):
        return ClientError(status, (
            "the model server does not serve the Open Inference Protocol: start TorchServe with "
            "ts_open_inference_protocol=true (config.properties)"
        ))
    return error


class Gateway:
    """The servicer; `server()` builds the grpc.Server around it."""

    def __init__(self, config: GatewayConfig, control: ControlDir | None, admission: Admission | None = None) -> None:
        self.config = config
        self.control = control
        self.admission: Admission = admission or PassThrough()
        self.pb2, self.pb2_grpc = stubs.load()
        self.channel = grpc.insecure_channel(
            config.upstream,
            options=[
                ("grpc.max_receive_message_length", config.max_response_bytes),
                ("grpc.max_send_message_length", config.max_request_bytes),
            ],
        )
        self.stub = self.pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.oip = oip_proto.load()
        self.oip_upstream = {
            method: self.channel.unary_unary(
                f"/{oip_proto.TORCHSERVE_SERVICE}/{method}",
                request_serializer=self.oip[request].SerializeToString,
                response_deserializer=self.oip[response].FromString,
            )
            for method, request, response in oip_proto.METHODS
        }
        self.calls_cancelled = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ server
    def server(self) -> grpc.Server:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="gateway"),
            maximum_concurrent_rpcs=self.config.max_concurrent_calls,
            options=[  # an oversized request is refused here (RESOURCE_EXHAUSTED), before any work
                ("grpc.max_receive_message_length", self.config.max_request_bytes),
                ("grpc.max_send_message_length", self.config.max_response_bytes),
            ],
        )
        handlers = {
            "Ping": grpc.unary_unary_rpc_method_handler(
                self.ping, empty_pb2.Empty.FromString, self.pb2.TorchServeHealthResponse.SerializeToString,
            ),
            "Predictions": grpc.unary_unary_rpc_method_handler(
                self.predictions, self.pb2.PredictionsRequest.FromString,
                self.pb2.PredictionResponse.SerializeToString,
            ),
            "StreamPredictions": grpc.unary_stream_rpc_method_handler(
                self.stream_predictions, self.pb2.PredictionsRequest.FromString,
                self.pb2.PredictionResponse.SerializeToString,
            ),
            "StreamPredictions2": grpc.stream_stream_rpc_method_handler(
                self.stream_predictions2, self.pb2.PredictionsRequest.FromString,
                self.pb2.PredictionResponse.SerializeToString,
            ),
        }
        service = self.pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
        oip_handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self.model_infer if method == "ModelInfer" else self._oip_passthrough(method),
                self.oip[request].FromString, self.oip[response].SerializeToString,
            )
            for method, request, response in oip_proto.METHODS
        }
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(service, handlers),
            grpc.method_handlers_generic_handler(oip_proto.SERVICE, oip_handlers),
        ))
        server.add_insecure_port(self.config.listen)
        return server

    # ------------------------------------------------------------------ RPCs
    def ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit(context, "Ping")
        try:
            return self._with_own_key(context, lambda metadata: self.stub.Ping(request, timeout=10, metadata=metadata))
        except grpc.RpcError as error:
            _abort(context, error)

    def predictions(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit(context, "Predictions")
        if _boolean(request.input.get(wire.INPUT_STREAM, b"false")):
            _abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                "invalid request: field 'stream' asks for streaming on a unary Predictions call; "
                "call StreamPredictions for progress and frames, or drop the field",
                ErrorCode.INVALID_REQUEST,
            )
        call = self._native_call(request, context)

        def invoke(metadata: list[tuple[str, str]]) -> Any:
            future = self.stub.Predictions.future(request, timeout=call.timeout_s, metadata=metadata)
            call.watch(future)
            return future.result()

        try:
            response = self._with_own_key(context, invoke)
        except grpc.RpcError as error:
            call.upstream_done = True
            _abort(context, error)
        call.upstream_done = True
        return response

    def stream_predictions(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._admit(context, "StreamPredictions")
        # Always "true" (TorchServe 0.12 kills the worker when a StreamPredictions call gets no
        # intermediate response); a value that is no boolean is left for the handler to refuse.
        if _boolean(request.input.get(wire.INPUT_STREAM, b"true")) is not None:
            request.input[wire.INPUT_STREAM] = b"true"
        call = self._native_call(request, context)

        def open_stream(metadata: list[tuple[str, str]]) -> tuple[Any, Any]:
            upstream = self.stub.StreamPredictions(request, timeout=call.timeout_s, metadata=metadata)
            call.watch(upstream)
            return upstream, next(upstream, None)  # a refused key shows on the first message

        try:
            upstream, first = self._with_own_key(context, open_stream)
            if first is not None:
                yield first
            for response in upstream:
                yield response
        except grpc.RpcError as error:
            call.upstream_done = True
            _abort(context, error)
        call.upstream_done = True

    def stream_predictions2(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamPredictions2 (sequence batching) is not offered; use StreamPredictions",
        )

    def _native_call(self, request: Any, context: grpc.ServicerContext) -> "_Call":
        """The call's deadline and call_id, written into the request's input map."""
        call = _Call(self, context, request.input.get(wire.INPUT_DEADLINE))
        if call.deadline is not None:
            request.input[wire.INPUT_DEADLINE] = f"{call.deadline:.3f}".encode()
        request.input[wire.INPUT_CALL_ID] = call.call_id.encode()
        return call

    # ------------------------------------------------------------------ Open Inference Protocol
    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """ModelInfer (unary; the handler never streams into it), with the deadline, call_id and
        cancel marker of Predictions, but the call to TorchServe is left for the stopped worker
        to answer (OIP_UPSTREAM_GRACE_S); guard/oip.py adapts request and response."""
        self._admit(context, "ModelInfer")
        sent = request.parameters.get(oip_names.PARAM_DEADLINE)
        call = _Call(self, context, None if sent is None else oip.parameter_value(sent))
        try:
            oip.upstream_request(request, deadline=call.deadline, call_id=call.call_id)
        except oip.OipError as error:
            _abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {error}", ErrorCode.INVALID_REQUEST)
        timeout = None if call.timeout_s is None else call.timeout_s + OIP_UPSTREAM_GRACE_S

        def invoke(metadata: list[tuple[str, str]]) -> Any:
            future = self.oip_upstream["ModelInfer"].future(request, timeout=timeout, metadata=metadata)
            call.watch(future, cancel_upstream=False)  # see OIP_UPSTREAM_GRACE_S
            return future.result()

        try:
            response = self._with_own_key(context, invoke)
        except grpc.RpcError as error:
            call.upstream_done = True
            translate_oip_error(error.code(), error.details() or "").abort(context)
        call.upstream_done = True
        try:
            oip.client_response(response)
        except oip.UpstreamFormatError as error:
            logger.error("unexpected ModelInfer answer from TorchServe: %s", error)
            _abort_with(context, grpc.StatusCode.INTERNAL, f"the model server's answer could not be read: {error}",
                        ErrorCode.INTERNAL)
        return response

    def _oip_passthrough(self, method: str):
        """ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata: forwarded as they
        are (ModelMetadata gets this model's tensors, which TorchServe leaves empty)."""
        upstream = self.oip_upstream[method]

        def forward(request: Any, context: grpc.ServicerContext) -> Any:
            self._admit(context, method)
            try:
                response = self._with_own_key(context, lambda metadata: upstream(request, timeout=10, metadata=metadata))
            except grpc.RpcError as error:
                translate_oip_error(error.code(), error.details() or "").abort(context)
            if method == "ModelMetadata" and not response.inputs and not response.outputs:
                _describe_tensors(response)
            return response

        return forward

    # ------------------------------------------------------------------ authentication
    def _admit(self, context: grpc.ServicerContext, method: str) -> None:
        refused = self.admission.refusal(context, method)
        if refused is not None:
            context.abort(*refused)

    def _with_own_key(self, context: grpc.ServicerContext, invoke: Any) -> Any:
        """`invoke(metadata)` with the upstream credentials; when TorchServe refused the gateway's
        own key (renewed meanwhile), once more with the new one. A client's own key is its business."""
        try:
            return invoke(self.admission.upstream_metadata(context))
        except grpc.RpcError as error:
            if not self._own_key_refused(error):
                raise
        if not self.admission.renew_upstream_key():
            context.abort(grpc.StatusCode.UNAVAILABLE, UPSTREAM_KEY_REFUSED)
        try:
            return invoke(self.admission.upstream_metadata(context))
        except grpc.RpcError as error:
            if self._own_key_refused(error):
                context.abort(grpc.StatusCode.UNAVAILABLE, UPSTREAM_KEY_REFUSED)
            raise

    def _own_key_refused(self, error: grpc.RpcError) -> bool:
        return self.admission.enabled and error.code() == grpc.StatusCode.PERMISSION_DENIED

    # ------------------------------------------------------------------ cancellation
    def cancel(self, call_id: str, reason: str) -> None:
        with self._lock:
            self.calls_cancelled += 1
        if self.control is not None:
            try:
                self.control.cancel(call_id, reason)
            except OSError:
                logger.exception("could not write the cancel marker of %s", call_id)


class _Call:
    """One proxied morph call: its deadline and call_id in the request, and what happens when
    the client's side of the call ends before TorchServe answered."""

    def __init__(self, gateway: Gateway, context: grpc.ServicerContext, sent_deadline: Any = None) -> None:
        """`sent_deadline`: the client's own deadline (field or parameter), if it sent one."""
        self.gateway = gateway
        self.context = context
        self.call_id = uuid.uuid4().hex
        self.upstream_done = False
        remaining = context.time_remaining()
        self.timeout_s = None if remaining is None or remaining > NO_DEADLINE_S else max(remaining, 0.0)
        deadlines = [] if self.timeout_s is None else [time.time() + self.timeout_s]
        if sent_deadline is not None:
            sent = _float(sent_deadline)
            if sent is None:
                deadlines = []  # not a number: left as sent, for the handler to refuse (400)
            else:
                deadlines.append(sent)  # the client's own deadline, if earlier
        # The deadline the request carries to the worker (None: leave what the client sent).
        self.deadline: float | None = min(deadlines) if deadlines else None

    def watch(self, upstream: Any, *, cancel_upstream: bool = True) -> None:
        """When the client's side ends first: the cancel marker, and (unless told not to) the
        upstream call cancelled too."""
        def on_end() -> None:
            if self.upstream_done:
                return
            expired = self.timeout_s is not None and (self.context.time_remaining() or 0) <= 0
            reason = "past its deadline" if expired else "cancelled by the client"
            self.gateway.cancel(self.call_id, reason)
            if cancel_upstream:
                upstream.cancel()

        self.context.add_callback(on_end)


def _abort(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    translate_error(error.code(), error.details() or "").abort(context)


def _abort_with(context: grpc.ServicerContext, status: grpc.StatusCode, details: str,
                code: ErrorCode | None) -> None:
    """context.abort, with the typed code (if any) in the trailing metadata."""
    if code is not None:
        context.set_trailing_metadata(((ERROR_CODE_METADATA, code.value),))
    context.abort(status, details)


def _boolean(value: bytes) -> bool | None:
    """The `stream` field as the handler reads it; None when it is no boolean."""
    text = value.decode("utf-8", "replace").strip().lower()
    return True if text in wire.STREAM_TRUE else False if text in wire.STREAM_FALSE else None


def _float(value: Any) -> float | None:
    """A client-sent deadline (field bytes, or an OIP parameter's value), if it is a finite number."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.decode("ascii") if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError, TypeError, OverflowError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _describe_tensors(response: Any) -> None:
    """The morph's tensors in a ModelMetadataResponse (-1: any size)."""
    for name, shape in ((oip_names.INPUT_IMAGES, [-1]), (oip_names.INPUT_PROMPTS, [-1])):
        response.inputs.add(name=name, datatype=oip_names.BYTES, shape=shape)
    for name, shape in ((oip_names.OUTPUT_FRAMES, [-1]), (oip_names.OUTPUT_METADATA, [1])):
        response.outputs.add(name=name, datatype=oip_names.BYTES, shape=shape)

