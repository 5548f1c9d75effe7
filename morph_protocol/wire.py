"""The morph service's message format: one JSON header plus binary parts, in one byte string.

TorchServe carries one opaque `bytes` payload per response (gRPC `PredictionResponse.prediction`,
REST body), but a morph answer is metadata (alphas, timings, seed) *and* media (a GIF, or one PNG
per frame). JSON with base64 media would grow every response by a third and is slow to parse
for multi-MB results, so a message is framed as::

    b"DMPH" | version (1 byte) | header length (4 bytes, big-endian) | header (UTF-8 JSON) | parts

The header is an object with at least `type` ("progress" | "frame" | "result") and `parts`, a
list of `{"name", "mime", "size"}` describing the bytes that follow, in order. Standard library
only: the server (handler) and any client share this module without torch or grpc.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"DMPH"
CONTENT_TYPE = "application/vnd.diffmorpher.message"  # REST Content-Type of a framed message
VERSION = 1
_PREFIX = struct.Struct("!4sBI")

TYPE_PROGRESS = "progress"
TYPE_FRAME = "frame"
TYPE_RESULT = "result"
MESSAGE_TYPES = (TYPE_PROGRESS, TYPE_FRAME, TYPE_RESULT)


class WireError(ValueError):
    """Bytes that are not a morph-service message (e.g. a proxy's HTML error page)."""


@dataclass(frozen=True)
class Part:
    name: str
    mime: str
    data: bytes


@dataclass
class Message:
    """A decoded message: `header` is the JSON metadata, `parts` the binary payloads."""

    type: str
    header: dict[str, Any]
    parts: list[Part] = field(default_factory=list)

    def part(self, index: int = 0) -> Part:
        if not 0 <= index < len(self.parts):
            raise WireError(f"{self.type} message has {len(self.parts)} part(s), no part {index}")
        return self.parts[index]


def encode_message(message_type: str, header: dict[str, Any], parts: list[Part] | None = None) -> bytes:
    """Frame a message. `header` must be JSON-serialisable; `type` and `parts` are filled in."""
    if message_type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message_type!r}; expected one of {MESSAGE_TYPES}")
    parts = parts or []
    full = {
        **header,
        "type": message_type,
        "parts": [{"name": p.name, "mime": p.mime, "size": len(p.data)} for p in parts],
    }
    header_bytes = json.dumps(full, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header_bytes)), header_bytes, *(p.data for p in parts)])


def decode_message(payload: bytes) -> Message:
    """Parse a framed message, checking that the sizes add up."""
    if len(payload) < _PREFIX.size:
        raise WireError(f"payload of {len(payload)} bytes is too short to be a morph message")
    magic, version, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        preview = bytes(payload[:80]).decode("utf-8", "replace")
        raise WireError(f"payload is not a morph message (starts with {preview!r})")
    if version != VERSION:
        raise WireError(f"unsupported message version {version}; this client reads {VERSION}")
    start = _PREFIX.size
    try:
        header = json.loads(bytes(payload[start : start + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"message header is not valid JSON: {error}") from error
    if not isinstance(header, dict) or header.get("type") not in MESSAGE_TYPES:
        raise WireError(f"message header has no valid type: {str(header)[:200]}")
    offset = start + header_len
    parts = []
    for spec in header.get("parts", []):
        size = int(spec["size"])
        if offset + size > len(payload):
            raise WireError(f"message is truncated: part {spec.get('name')!r} needs {size} bytes")
        parts.append(Part(str(spec["name"]), str(spec["mime"]), bytes(payload[offset : offset + size])))
        offset += size
    if offset != len(payload):
        raise WireError(f"message has {len(payload) - offset} unexpected trailing bytes")
    return Message(header["type"], header, parts)


# ---------------------------------------------------------------------------- request input map
# A morph request is TorchServe's input map (gRPC `PredictionsRequest.input`, or the fields of a
# REST multipart/form-data body): `image_0`, `image_1`, ... (encoded image bytes), `prompt_0`,
# `prompt_1`, ... (UTF-8, one per image); in place of `image_<i>`, `image_ref_<i>`: the
# `image_key` a previous result returned for an image (its `cache` metadata), so the image is
# not sent again and its fitted LoRA and inverted latent are reused; `lora_<i>` (optional): a
# LoRA for image i as safetensors (diffusers' LoRA format, as a result's LoRA part), used instead
# of fitting one (limits.MAX_LORA_BYTES); `options` (UTF-8 JSON object: MorphConfig fields plus
# `format`, `frame_duration_ms`, `loop`, and for `webp` `webp_quality`, `webp_lossless`) and
# `stream` ("true" only on StreamPredictions).
# `deadline` (optional): when the caller stops waiting, as Unix time in seconds (a decimal
# string); the server stops the morph then, and does not start it if it is already past. The
# gateway in front of TorchServe sets it from the gRPC deadline. `call_id` is the gateway's own
# (32 hex digits): it names the call's cancellation marker on the server.
INPUT_OPTIONS = "options"
INPUT_STREAM = "stream"
INPUT_DEADLINE = "deadline"
INPUT_CALL_ID = "call_id"
STREAM_TRUE = ("true", "1", "yes")  # accepted values of `stream` (case-insensitive)
STREAM_FALSE = ("false", "0", "no", "")
# The fields' limits (image count, options size, ...) are morph_protocol.limits'; a failed request's
# typed code is morph_protocol.errors'.
# One image and K >= 2 prompts (`image_0`, `prompt_0` .. `prompt_<K-1>`): the server makes the
# other K-1 endpoints from the image and returns each as a result part `endpoint_<k>.png` (k the
# index of its prompt) of MIME type MIME_ENDPOINT: a PNG whose type parameter keeps it apart from
# the frames (`image/png` parts are the frames, in order); the header's `endpoints` lists them.
MIME_ENDPOINT = "image/png; role=endpoint"
# An image reference is the SHA-256 (hex) of the image as the server prepared it.
IMAGE_REF_LENGTH = 64


@dataclass(frozen=True)
class ImageRef:
    """An image the server has seen before, by the `image_key` of a previous result."""

    key: str


def image_key(index: int) -> str:
    return f"image_{index}"


def image_ref_key(index: int) -> str:
    return f"image_ref_{index}"


def prompt_key(index: int) -> str:
    return f"prompt_{index}"


def endpoint_part_name(index: int) -> str:
    """The result part of the endpoint the server made for prompt `index` (one-image morphs)."""
    return f"endpoint_{index}.png"


# A result carries the morph's LoRAs when the options ask for them (`return_loras`): one part per
# endpoint (each image, and the endpoints made from one image), `lora_<i>.safetensors`, of MIME_SAFETENSORS, in diffusers' LoRA format (loadable with
# `load_lora_weights`); the same bytes sent back as `lora_<i>` skip that image's fit.
MIME_SAFETENSORS = "application/vnd.safetensors"
LORA_PART_SUFFIX = ".safetensors"


def lora_key(index: int) -> str:
    """The request field of a LoRA sent for image `index`."""
    return f"lora_{index}"


def lora_part_name(index: int) -> str:
    """The result part of image `index`'s LoRA."""
    return f"lora_{index}{LORA_PART_SUFFIX}"
