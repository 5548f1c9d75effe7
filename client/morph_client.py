"""gRPC client for the morph service behind TorchServe (grpcio + protobuf; no torch, no core).

Three TorchServe-specific facts shape it:
- Responses can be tens of MB (long GIFs), over gRPC's 4 MiB default receive limit, so the
  channel raises `grpc.max_receive_message_length` (and the send limit for 4 large images).
- Streaming must be asked for in the *input map* (`stream`), and only on StreamPredictions: a
  handler that streams into a unary Predictions call kills its worker in TorchServe 0.12.
- The bearer token from TorchServe's key file expires; on PERMISSION_DENIED the key file is
  re-read once and the call repeated.
Only UNAVAILABLE (server starting, restarting, or unreachable) is retried, with backoff; every
other status is reported with a message saying what to do, and the typed code (MorphClientError
.error_code, morph_protocol.errors) the gateway returns as trailing metadata, or the worker's
tag when the client talks to TorchServe directly.
"""

from __future__ import annotations

import json

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

from grpc_api import stubs
from morph_protocol import limits, wire
from morph_protocol.errors import ERROR_CODE_METADATA, ErrorCode, parse_error
from morph_protocol.formats import MIME_TYPES
from morph_protocol.keyfile import TokenSource
from morph_protocol.torchserve import is_busy_message

DEFAULT_TARGET = "127.0.0.1:7070"
DEFAULT_MODEL = "diffmorpher"
# The gRPC message limit: TorchServe's max_response_size plus a response's framing, in MiB.
DEFAULT_MAX_MESSAGE_MB = -(-(limits.MAX_RESPONSE_BYTES + limits.RESPONSE_FRAMING_BYTES) // limits.MiB)
# How much longer the gRPC call waits than the morph's own deadline (the request's `deadline`
# field): the worker stops at its deadline within a step and answers DEADLINE_EXCEEDED in the
# service's words (where it stopped, what to change); a transport timer firing first would hide
# that behind grpc's bare "Deadline Exceeded".
DEADLINE_GRACE_S = 5.0

# What to tell a user for each status TorchServe (or the transport) can return.
STATUS_HINTS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "the request is invalid",
    grpc.StatusCode.PERMISSION_DENIED: "token rejected: pass --token, set DIFFMORPHER_TOKEN, or "
    "point --key-file at the key_file.json TorchServe wrote",
    grpc.StatusCode.UNAUTHENTICATED: "authentication required: pass a token",
    grpc.StatusCode.NOT_FOUND: "the model is not registered on this server (check --model), or "
    "an image reference (ref:<image_key>) is no longer in the server's cache: send the image",
    grpc.StatusCode.UNAVAILABLE: "server unreachable or no worker ready (is TorchServe running?)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the morph took longer than the deadline: raise "
    "--deadline, or ask for fewer frames / steps",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a message exceeded a size limit (server "
    "max_request_size / max_response_size, or the client's receive limit) or the queue is full",
    grpc.StatusCode.INTERNAL: "the server failed while morphing (see its model log)",
    grpc.StatusCode.UNKNOWN: "the server failed without a reason (see its logs)",
    grpc.StatusCode.CANCELLED: "the call was cancelled",
    grpc.StatusCode.UNIMPLEMENTED: "the server does not offer this RPC",
    grpc.StatusCode.FAILED_PRECONDITION: "the server refused the request in its current state",
    grpc.StatusCode.ABORTED: "the server aborted the request",
    grpc.StatusCode.OUT_OF_RANGE: "a value was out of range",
}


# The gateway answers a full queue as UNAVAILABLE with the code `busy`. TorchServe 0.12 itself
# (called directly) answers it as INTERNAL (REST: 503), not RESOURCE_EXHAUSTED, with a message
# that is all that tells "busy" from a real failure (morph_protocol.torchserve knows its words).
BUSY_HINT = "server busy: its job queue is full; retry later with backoff"


def is_busy(code: grpc.StatusCode | None, details: str, error_code: ErrorCode | None = None) -> bool:
    """A full queue: by the typed code where the server sent one, else by TorchServe's words."""
    if error_code is not None:
        return error_code == ErrorCode.BUSY
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE) and is_busy_message(details)


class MorphClientError(RuntimeError):
    """A failed call: the gRPC status (`code`), the server's message for people (`details`, no
    Java class, no tag) and its typed code (`error_code`: the gateway's trailing metadata, or the
    worker's tag when TorchServe is called directly; None where no one said one)."""

    def __init__(self, code: grpc.StatusCode | None, details: str, hint: str = "",
                 error_code: ErrorCode | None = None) -> None:
        self.code = code
        tagged, details = parse_error(details)
        self.details = details
        self.error_code = error_code or tagged
        self.busy = is_busy(code, details, self.error_code)
        default_hint = BUSY_HINT if self.busy else STATUS_HINTS.get(code, "") if code else ""
        self.hint = hint or default_hint
        name = code.name if code else "CLIENT"
        super().__init__(f"{name}: {details}" + (f" ({self.hint})" if self.hint else ""))

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "MorphClientError":
        """The failed call's status, details and the code in its trailing metadata."""
        return cls(error.code(), error.details() or "", error_code=_metadata_code(error))


@dataclass
class MorphResult:
    """The final answer: metadata (alphas, timings, seed, metric, ...) and the encoded parts."""

    metadata: dict[str, Any]
    parts: list[wire.Part]
    streamed_frames: list[bytes] = field(default_factory=list)  # PNGs, when streamed
    progress: list[dict[str, Any]] = field(default_factory=list)  # progress headers, in order

    def part_for(self, fmt: str) -> wire.Part:
        for part in self.parts:
            if part.mime == MIME_TYPES.get(fmt):
                return part
        raise MorphClientError(None, f"the result has no {fmt} part: {[p.name for p in self.parts]}")

    @property
    def endpoints(self) -> list[wire.Part]:
        """The endpoints the server made (one image and K prompts): PNGs `endpoint_<k>.png`."""
        return [part for part in self.parts if part.mime == wire.MIME_ENDPOINT]

    def save_endpoints(self, out: str | Path) -> list[Path]:
        """Each made endpoint beside `out`: `morph.gif` -> `morph.endpoint_1.png`, ..."""
        out = Path(out)
        written = []
        for part in self.endpoints:
            path = out.with_name(f"{out.stem}.{part.name}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(part.data)
            written.append(path)
        return written

    def lora_parts(self) -> list[wire.Part]:
        """The morph's LoRAs (`return_loras`): one diffusers LoRA file per endpoint (image)."""
        return [part for part in self.parts if part.mime == wire.MIME_SAFETENSORS]

    def save_loras(self, directory: str | Path) -> list[Path]:
        """Write each LoRA part as `<directory>/lora_<i>.safetensors`: loadable with diffusers'
        `load_lora_weights`, and sendable back (`loras=`) to skip that image's fit."""
        directory = Path(directory)
        parts = self.lora_parts()
        if not parts:
            raise MorphClientError(None, "the result has no LoRA parts: ask with the option return_loras=true "
                                         "(and use_lora true)")
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for part in parts:
            path = directory / Path(part.name).name  # a name from the server never leaves the directory
            path.write_bytes(part.data)
            written.append(path)
        return written

    def save(self, out: str | Path, fmt: str) -> list[Path]:
        """Write the `fmt` part to `out` (for `png`, every frame PNG into the directory `out`)."""
        out = Path(out)
        if fmt == "png":
            out.mkdir(parents=True, exist_ok=True)
            written = []
            for part in self.parts:
                if part.mime == "image/png":
                    (out / part.name).write_bytes(part.data)
                    written.append(out / part.name)
            return written
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.part_for(fmt).data)
        return [out]


EventCallback = Callable[[wire.Message], None]


def build_input(
    images: Sequence[bytes | wire.ImageRef],
    prompts: Sequence[str],
    options: dict[str, Any] | None,
    *,
    stream: bool,
    deadline_s: float | None = None,
    loras: Sequence[bytes | None] | None = None,
) -> dict[str, bytes]:
    """The TorchServe input map for one morph (see morph_protocol/wire.py for the schema). With
    `deadline_s` the request carries its deadline, so the server stops working on it when this
    client stops waiting (the gateway also derives it from the gRPC deadline). An image may be
    a `wire.ImageRef` (the `image_key` of a previous result) instead of its bytes. `loras`: per
    endpoint (each image; with one image, each prompt's endpoint, made ones too), a LoRA file (a
    result's LoRA part) to use instead of fitting one, or None."""
    if len(images) == 1:  # one image, K >= 2 prompts: the server makes the other endpoints
        if not limits.MIN_ONE_IMAGE_PROMPTS <= len(prompts) <= limits.MAX_ONE_IMAGE_PROMPTS:
            raise MorphClientError(
                None, f"a morph needs at least {limits.MIN_IMAGES} images, or one image and "
                      f"{limits.MIN_ONE_IMAGE_PROMPTS} to {limits.MAX_ONE_IMAGE_PROMPTS} prompts; "
                      f"got 1 image and {len(prompts)} prompt(s)")
    elif len(images) < limits.MIN_IMAGES:
        raise MorphClientError(None, f"a morph needs at least {limits.MIN_IMAGES} images, got {len(images)}")
    elif len(images) > limits.MAX_IMAGES:
        raise MorphClientError(None, f"at most {limits.MAX_IMAGES} images per morph, got {len(images)}")
    elif len(prompts) != len(images):
        raise MorphClientError(None, f"one prompt per image: {len(images)} images, {len(prompts)} prompts")
    data: dict[str, bytes] = {}
    for index, image in enumerate(images):
        if isinstance(image, wire.ImageRef):
            data[wire.image_ref_key(index)] = image.key.encode("ascii")
        else:
            data[wire.image_key(index)] = bytes(image)
    for index, prompt in enumerate(prompts):
        data[wire.prompt_key(index)] = prompt.encode("utf-8")
    if loras is not None and len(loras) != len(prompts):  # one per endpoint; as many as prompts
        what = f"{len(images)} images" if len(images) > 1 else f"1 image and {len(prompts)} prompts"
        raise MorphClientError(None, f"one LoRA (or None) per image (or prompt, with one image): {what}, "
                                     f"{len(loras)} LoRAs")
    for index, lora in enumerate(loras or []):
        if lora is None:
            continue
        if not 0 < len(lora) <= limits.MAX_LORA_BYTES:
            raise MorphClientError(None, f"LoRA {index} is {len(lora)} bytes; a LoRA has 1 to "
                                         f"{limits.MAX_LORA_BYTES} bytes")
        data[wire.lora_key(index)] = bytes(lora)
    data[wire.INPUT_OPTIONS] = json.dumps(options or {}).encode("utf-8")
    if stream:
        data[wire.INPUT_STREAM] = b"true"
    if deadline_s is not None:
        data[wire.INPUT_DEADLINE] = f"{time.time() + deadline_s:.3f}".encode()
    return data


class MorphClient:
    """One channel to TorchServe's gRPC inference port. Use as a context manager."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        model: str = DEFAULT_MODEL,
        *,
        tokens: TokenSource | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.target = target
        self.model = model
        self.tokens = tokens or TokenSource()
        self.retries = retries
        self.backoff_s = backoff_s
        limit = max_message_mb * limits.MiB
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # A name that resolves to several replicas (e.g. dns:///diffmorpher-pods...:7070,
                # a headless Service) gets its calls spread over them, not pinned to the first.
                ("grpc.lb_policy_name", "round_robin"),
            ],
        )
        self._pb2, pb2_grpc = stubs.load()
        self._stub = pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MorphClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def ping(self, timeout_s: float = 10.0) -> str:
        from google.protobuf import empty_pb2

        response = self._call(lambda md: self._stub.Ping(empty_pb2.Empty(), timeout=timeout_s, metadata=md))
        return str(response.health)

    def morph(
        self,
        images: Sequence[bytes | wire.ImageRef],
        prompts: Sequence[str],
        options: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
        loras: Sequence[bytes | None] | None = None,
    ) -> MorphResult:
        """Unary Predictions: one response holding the final result. `loras`: build_input's."""
        request = self._request(images, prompts, options, stream=False, deadline_s=deadline_s, loras=loras)
        message = self._unary(request, _with_grace(deadline_s))
        if message.type != wire.TYPE_RESULT:
            raise MorphClientError(None, f"expected a result message, got {message.type!r}")
        return MorphResult(message.header, message.parts)

    def predict(self, fields: dict[str, bytes], *, deadline_s: float | None = None) -> wire.Message:
        """Unary Predictions with a raw input map, unchecked (tests, load tests, other handlers).
        Never put `stream` in it: see the module docstring."""
        if wire.INPUT_STREAM in fields:
            raise MorphClientError(None, "a unary call must not ask for streaming; use morph_stream")
        return self._unary(self._pb2.PredictionsRequest(model_name=self.model, input=fields), deadline_s)

    def morph_stream(
        self,
        images: Sequence[bytes | wire.ImageRef],
        prompts: Sequence[str],
        options: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
        on_event: EventCallback | None = None,
        loras: Sequence[bytes | None] | None = None,
    ) -> MorphResult:
        """StreamPredictions: progress and frame messages (passed to `on_event`), then the result."""
        request = self._request(images, prompts, options, stream=True, deadline_s=deadline_s, loras=loras)
        streamed: list[bytes] = []
        progress: list[dict[str, Any]] = []
        for message in self._stream(request, _with_grace(deadline_s)):
            if on_event is not None:
                on_event(message)
            if message.type == wire.TYPE_PROGRESS:
                progress.append(message.header)
            elif message.type == wire.TYPE_FRAME:
                streamed.append(message.part().data)
            else:
                return MorphResult(message.header, message.parts, streamed, progress)
        raise MorphClientError(None, "the stream ended without a result message")

    # ------------------------------------------------------------------ plumbing
    def _unary(self, request, timeout_s: float | None) -> wire.Message:
        """One Predictions call (token refresh, UNAVAILABLE retries), decoded."""
        response = self._call(lambda md: self._stub.Predictions(request, timeout=timeout_s, metadata=md))
        return _decode(response.prediction)

    def _request(self, images, prompts, options, *, stream: bool, deadline_s: float | None, loras=None):
        fields = build_input(images, prompts, options, stream=stream, deadline_s=deadline_s, loras=loras)
        return self._pb2.PredictionsRequest(model_name=self.model, input=fields)

    def _call(self, invoke: Callable[[list[tuple[str, str]]], Any]) -> Any:
        """Run a unary call with token refresh (once) and UNAVAILABLE retries."""
        retry = self._retry()
        while True:
            try:
                return invoke(self.tokens.metadata())
            except grpc.RpcError as error:
                if retry.again(error.code()):
                    continue
                raise MorphClientError.from_rpc(error) from error

    def _stream(self, request, timeout_s: float | None) -> Iterator[wire.Message]:
        """Iterate a StreamPredictions call. Retries/refresh only before the first message, so
        a morph is never silently restarted half-way."""
        retry = self._retry()
        while True:
            received = False
            try:
                call = self._stub.StreamPredictions(
                    request, timeout=timeout_s, metadata=self.tokens.metadata()
                )
                for response in call:
                    received = True
                    yield _decode(response.prediction)
                return
            except grpc.RpcError as error:
                if not received and retry.again(error.code()):
                    continue
                raise MorphClientError.from_rpc(error) from error

    def _retry(self) -> "_Retry":
        return _Retry(self.tokens, self.retries, self.backoff_s)


@dataclass
class _Retry:
    """One call's second chances: a token refresh (once, when the server refused the key) and
    UNAVAILABLE retries with exponential backoff."""

    tokens: TokenSource
    retries: int
    backoff_s: float
    refreshed: bool = False
    attempt: int = 0

    def again(self, code: grpc.StatusCode | None) -> bool:
        """True when the call should be made again (after sleeping the backoff)."""
        if code == grpc.StatusCode.PERMISSION_DENIED and not self.refreshed and self.tokens.refresh():
            self.refreshed = True
            return True
        if code == grpc.StatusCode.UNAVAILABLE and self.attempt < self.retries:
            self.attempt += 1
            time.sleep(self.backoff_s * 2 ** (self.attempt - 1))
            return True
        return False


def _metadata_code(error: grpc.RpcError) -> ErrorCode | None:
    """The gateway's typed code (trailing metadata `diffmorpher-error-code`), if it sent a known one."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == ERROR_CODE_METADATA:
            try:
                return ErrorCode(value)
            except ValueError:
                return None  # a code newer than this client
    return None


def _with_grace(deadline_s: float | None) -> float | None:
    """The gRPC timeout of a call whose request carries `deadline_s` as its own deadline."""
    return None if deadline_s is None else deadline_s + DEADLINE_GRACE_S


def _decode(payload: bytes) -> wire.Message:
    try:
        return wire.decode_message(payload)
    except wire.WireError as error:
        raise MorphClientError(None, f"unreadable response: {error}") from error
