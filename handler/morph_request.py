"""Decoding one morph request from a serving framework's input map (no framework import).

TorchServe hands a handler one dict per request: for gRPC the `PredictionsRequest.input` map
(every value bytes), for REST multipart/form-data one entry per form field (bytes for files, str
for text fields, an already-parsed dict for `application/json` parts). The schema is documented in
`client/wire.py`; every violation raises ConfigError with a message naming the field.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image, UnidentifiedImageError

from client import wire
from diffmorpher.config import ConfigError, MorphConfig, OutputOptions

OUTPUT_KEYS = ("format", "frame_duration_ms", "loop")
# Chosen by the server (they follow from how the pipeline was loaded), never by a request.
SERVER_KEYS = ("device", "dtype")
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PROMPT_CHARS = 2000


@dataclass
class MorphRequest:
    images: list[Image.Image]
    prompts: list[str]
    config: MorphConfig
    outputs: list[OutputOptions]  # one per requested format, same duration/loop
    stream: bool

    @property
    def formats(self) -> list[str]:
        return [o.format for o in self.outputs]


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ConfigError(f"field {name!r} must be bytes, got {type(value).__name__}")


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return _as_bytes(name, value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"field {name!r} must be UTF-8 text: {error}") from error


def decode_image(name: str, value: Any) -> Image.Image:
    """An RGB image from encoded bytes (PNG, JPEG, WebP, ...), size-checked before decoding."""
    data = _as_bytes(name, value)
    if not data:
        raise ConfigError(f"field {name!r} is empty; expected an encoded image (PNG, JPEG, WebP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ConfigError(
                    f"field {name!r} is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels"
                )
            image.load()
    except ConfigError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ConfigError(
            f"field {name!r} is not a readable image ({len(data)} bytes starting {data[:8]!r}); "
            f"send PNG, JPEG, WebP or another format Pillow reads"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ConfigError(f"field {name!r} is a damaged or truncated image: {error}") from error
    return image.convert("RGB")


def parse_options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    text = _as_text(wire.INPUT_OPTIONS, value).strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"field 'options' is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise ConfigError(f"field 'options' must be a JSON object, got {type(options).__name__}")
    return options


def parse_stream(value: Any) -> bool:
    if value is None:
        return False
    text = _as_text(wire.INPUT_STREAM, value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"field 'stream' must be true or false, got {text[:20]!r}")


def split_options(
    options: Mapping[str, Any], defaults: MorphConfig
) -> tuple[MorphConfig, list[OutputOptions]]:
    """Request options -> (MorphConfig over the server defaults, one OutputOptions per format).
    `format` may be one name or a list (several encodings of one morph)."""
    options = dict(options)
    for key in SERVER_KEYS:
        if key in options and options[key] != getattr(defaults, key):
            raise ConfigError(
                f"option {key!r} is set by the server ({getattr(defaults, key)!r}); "
                f"remove it from the request"
            )
        options.pop(key, None)
    output = {k: options.pop(k) for k in OUTPUT_KEYS if k in options}
    formats = output.pop("format", OutputOptions().format)
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise ConfigError(f"format must be a name or a non-empty list of names, got {formats!r}")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"format lists a format twice: {formats}")
    config = MorphConfig.from_dict(defaults.to_dict(), **options)
    outputs = [OutputOptions(format=f, **output) for f in formats]
    return config, outputs


def parse_request(data: Mapping[str, Any], defaults: MorphConfig) -> MorphRequest:
    """Validate and decode one request's input map."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"request must be a map of fields, got {type(data).__name__}")
    fields = dict(data)
    count = 0
    while wire.image_key(count) in fields:
        count += 1
    if count < 2:
        body_hint = (
            " (REST requests must be multipart/form-data, e.g. curl -F image_0=@a.png ...)"
            if "body" in fields or "data" in fields else ""
        )
        raise ConfigError(
            f"a morph needs at least 2 images in fields image_0, image_1, ...; got {count}"
            f"{body_hint}. Fields received: {sorted(fields)[:20]}"
        )
    if count > wire.MAX_IMAGES:
        raise ConfigError(f"at most {wire.MAX_IMAGES} images per morph, got {count}")
    prompts = []
    for index in range(count):
        key = wire.prompt_key(index)
        if key not in fields:
            raise ConfigError(f"missing prompt {key!r} for image {index}: send one prompt per image")
        prompt = _as_text(key, fields[key])
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompt {key!r} is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        prompts.append(prompt)
    expected = {wire.image_key(i) for i in range(count)} | {wire.prompt_key(i) for i in range(count)}
    expected |= {wire.INPUT_OPTIONS, wire.INPUT_STREAM, wire.INPUT_DEADLINE, wire.INPUT_CALL_ID}
    unknown = sorted(set(fields) - expected)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown}; expected image_0..image_{count - 1}, "
            f"prompt_0..prompt_{count - 1}, options, stream, deadline"
        )
    config, outputs = split_options(parse_options(fields.get(wire.INPUT_OPTIONS)), defaults)
    stream = parse_stream(fields.get(wire.INPUT_STREAM))
    images = [decode_image(wire.image_key(i), fields[wire.image_key(i)]) for i in range(count)]
    return MorphRequest(images, prompts, config, outputs, stream)
