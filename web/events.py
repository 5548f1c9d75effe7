"""The page's event stream: one morph's progress, frames, result or error as server-sent events.

The browser gets exactly what the service streamed, re-framed as SSE (`event: <type>` plus one
JSON `data:` line), with media as base64 so that the page needs no second request and the web
process keeps nothing once the stream ends.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from morph_protocol import wire
from morph_protocol.formats import FRAMES_ZIP, GIF, MIME_TYPES, MP4, WEBP
from client.morph_client import MorphClientError, MorphResult

EVENT_ACCEPTED = "accepted"
EVENT_PROGRESS = "progress"
EVENT_FRAME = "frame"
EVENT_RESULT = "result"
EVENT_ERROR = "error"
# A comment line: keeps proxies from closing an idle stream and lets the server notice a closed
# browser tab while the service is still fitting LoRAs.
KEEPALIVE = b": keep-alive\n\n"
# Result parts the page offers, by MIME type: the key the page looks them up under.
MEDIA_KEYS = {MIME_TYPES[GIF]: "gif", MIME_TYPES[MP4]: "mp4", MIME_TYPES[FRAMES_ZIP]: "zip",
              MIME_TYPES[WEBP]: "webp"}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event. JSON never contains a raw newline, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def for_message(message: wire.Message) -> bytes:
    """A streamed progress or frame message of the service, for the page."""
    header = message.header
    if message.type == wire.TYPE_FRAME:
        return sse(EVENT_FRAME, {
            "index": header.get("index"), "num_frames": header.get("num_frames"),
            "stage": header.get("stage"), "png": _b64(message.part().data),
        })
    return sse(EVENT_PROGRESS, {key: header.get(key) for key in ("stage", "step", "total", "item")})


def for_result(result: MorphResult) -> bytes:
    """The final answer: the service's metadata as it sent it, plus the GIF, MP4, ZIP (and WebP),
    and the morph's LoRA files when it was asked for them (return_loras)."""
    media = {}
    for part in result.parts:
        key = MEDIA_KEYS.get(part.mime)
        if key:
            media[key] = _media(part)
    loras = [_media(part) for part in result.lora_parts()]
    # One image and several prompts: the endpoints the service made, as PNGs, in prompt order.
    endpoints = [{"name": part.name, "png": _b64(part.data)} for part in result.endpoints]
    return sse(EVENT_RESULT, {"metadata": result.metadata, "media": media, "loras": loras, "endpoints": endpoints})


def _media(part: wire.Part) -> dict[str, Any]:
    return {"name": part.name, "mime": part.mime, "size": len(part.data), "data": _b64(part.data)}


def for_client_error(error: MorphClientError) -> bytes:
    """A refusal or failure in the service's own words (`details`), with its status name."""
    return error_event(error.code.name if error.code else "CLIENT", error.details, error.hint)


def error_event(code: str, message: str, hint: str = "") -> bytes:
    return sse(EVENT_ERROR, {"code": code, "message": message, "hint": hint})
