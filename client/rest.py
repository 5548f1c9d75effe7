"""REST client for TorchServe's inference API: `POST /predictions/<model>`, multipart/form-data.

The body is the morph's input map (the fields `client.morph_client.build_input` produces, the
same map gRPC carries), one form field per entry, as `curl -F` sends it: `image_*` fields as
files, `options` as application/json, everything else as text. The answer is a
`morph_protocol.wire` message (200) or TorchServe's error text (any other status).

Standard library only (http.client): under Locust's gevent monkey-patching its sockets are
cooperative, and the hostile-input corpus can send any field map or any bytes with it
(`post_fields`, `post_body`), malformed on purpose. One connection per request, closed after
the answer. No answer at all (refused, reset, timed out) raises `RestNoAnswer`; `closed` says the
server closed a connection it had accepted: TorchServe answers an oversized body with 413 and
closes while the client is still uploading, and a client that cannot read that early answer
sees only the close.
"""

from __future__ import annotations

import http.client
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlsplit

from morph_protocol import wire
from morph_protocol.keyfile import TokenSource
from morph_protocol.torchserve import TOKEN_REFUSED

from .morph_client import DEADLINE_GRACE_S, DEFAULT_MODEL, build_input

DEFAULT_REST_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 600.0  # sending the body and waiting for the answer
FILE_CONTENT_TYPE = "application/octet-stream"
TEXT_CONTENT_TYPE = "text/plain"
JSON_CONTENT_TYPE = "application/json"


# ---------------------------------------------------------------------------- the body
def is_file_field(name: str) -> bool:
    """Fields sent as file uploads (`image_<i>`, also `image_ref_<i>`, as the load test and the
    corpus always sent them; `lora_<i>`); TorchServe hands the worker their bytes unchanged."""
    return name.startswith(("image_", "lora_"))


def field_content_type(name: str) -> str:
    if is_file_field(name):
        return FILE_CONTENT_TYPE
    return JSON_CONTENT_TYPE if name == wire.INPUT_OPTIONS else TEXT_CONTENT_TYPE


def encode_multipart(fields: Mapping[str, bytes | str], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body of `fields` (sent as given: names and values are not checked)
    and its Content-Type header value."""
    values = {name: value.encode("utf-8") if isinstance(value, str) else bytes(value)
              for name, value in fields.items()}  # fmt: skip
    if boundary is None:
        boundary = uuid.uuid4().hex
        while any(boundary.encode() in data for data in values.values()):
            boundary = uuid.uuid4().hex
    elif any(boundary.encode() in data for data in values.values()):
        raise ValueError(f"boundary {boundary!r} occurs in a field's value")
    chunks = []
    for name, data in values.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{name}"' if is_file_field(name) else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                      f"Content-Type: {field_content_type(name)}\r\n\r\n".encode("utf-8"))
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class RestAnswer:
    """An HTTP answer: status, body bytes and Content-Type."""

    status: int
    body: bytes
    content_type: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        """The body as text (TorchServe's error answers are JSON or plain text)."""
        return self.body.decode("utf-8", "replace")

    def message(self) -> wire.Message:
        """The body as a morph message; `wire.WireError` when it is not one."""
        return wire.decode_message(self.body)


class RestNoAnswer(ConnectionError):
    """No HTTP answer came back (connection refused or closed, timeout). `closed`: the server
    closed a connection it had accepted, without an answer this client could read."""

    def __init__(self, message: str, *, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


class RestError(RuntimeError):
    """A morph the server answered with an error status, or with a body that is no message."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


def token_refused(status: int, text: str) -> bool:
    """TorchServe refused the bearer token (it answers 400 with its own text, or 401/403)."""
    return status in (401, 403) or (status == 400 and TOKEN_REFUSED in text)


# ---------------------------------------------------------------------------- the client
class RestClient:
    """TorchServe's inference API at `base_url` (http://host:port, optionally with a path)."""

    def __init__(
        self,
        base_url: str = DEFAULT_REST_URL,
        model: str = DEFAULT_MODEL,
        *,
        tokens: TokenSource | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"REST URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.base_url = base_url
        self.model = model
        self.tokens = tokens or TokenSource()
        self.connect_timeout_s = connect_timeout_s
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self.path = f"{parts.path.rstrip('/')}/predictions/{quote(model, safe='')}"

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/predictions/{quote(self.model, safe='')}"

    # ------------------------------------------------------------------ one POST
    def post_body(self, body: bytes, content_type: str | None, *, token: str | None,
                  timeout_s: float | None = DEFAULT_TIMEOUT_S) -> RestAnswer:
        """POST `body` as it is (any bytes, any Content-Type; None: no Content-Type header),
        with `token` as the bearer token (None: no Authorization header). One attempt."""
        headers = {"Content-Type": content_type} if content_type is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self.connect_timeout_s)
        try:
            try:
                connection.connect()
            except OSError as error:
                raise RestNoAnswer(f"cannot connect to {self.url}: {error}") from error
            connection.sock.settimeout(timeout_s)
            try:
                connection.request("POST", self.path, body=body, headers=headers)
            except ConnectionError as error:  # closed mid-upload: its early answer may be readable
                return self._read(connection, f"the server closed the connection during the upload: {error}")
            except OSError as error:  # a timeout, typically
                raise RestNoAnswer(f"sending to {self.url} failed: {error or type(error).__name__}") from error
            return self._read(connection, "")
        finally:
            connection.close()

    def _read(self, connection: http.client.HTTPConnection, closed_during_upload: str) -> RestAnswer:
        try:
            response = connection.getresponse()
            return RestAnswer(response.status, response.read(), response.getheader("Content-Type", "") or "")
        except (ConnectionError, http.client.IncompleteRead) as error:  # incl. RemoteDisconnected
            raise RestNoAnswer(closed_during_upload or f"the server closed the connection without a "
                               f"complete answer: {error!r}", closed=True) from error  # fmt: skip
        except http.client.HTTPException as error:
            raise RestNoAnswer(f"unreadable HTTP answer from {self.url}: {error!r}") from error
        except OSError as error:  # a timeout, typically
            raise RestNoAnswer(f"no answer from {self.url}: {error or type(error).__name__}") from error

    def post_fields(self, fields: Mapping[str, bytes | str], *, token: str | None,
                    timeout_s: float | None = DEFAULT_TIMEOUT_S) -> RestAnswer:
        """POST `fields` as multipart/form-data, unchecked (any names, any values). One attempt."""
        body, content_type = encode_multipart(fields)
        return self.post_body(body, content_type, token=token, timeout_s=timeout_s)

    # ------------------------------------------------------------------ with the token source
    def predict(self, fields: Mapping[str, bytes | str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> RestAnswer:
        """POST `fields` with the token source's token; a refused token is re-read from the key
        file once and the request repeated (keys expire). Any status is returned."""
        answer = self.post_fields(fields, token=self.tokens.get(), timeout_s=timeout_s)
        if token_refused(answer.status, answer.text) and self.tokens.refresh():
            answer = self.post_fields(fields, token=self.tokens.get(), timeout_s=timeout_s)
        return answer

    def morph(self, images: Sequence[bytes | wire.ImageRef], prompts: Sequence[str],
              options: dict[str, Any] | None = None, *, deadline_s: float | None = None) -> wire.Message:
        """One morph: its result message, or RestError with the server's status and text."""
        fields = build_input(images, prompts, options, stream=False, deadline_s=deadline_s)
        answer = self.predict(fields, timeout_s=None if deadline_s is None else deadline_s + DEADLINE_GRACE_S)
        if not answer.ok:
            raise RestError(answer.status, answer.text)
        try:
            return answer.message()
        except wire.WireError as error:
            raise RestError(answer.status, f"unreadable response: {error}") from error
