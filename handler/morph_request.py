"""Decoding one morph request from a serving framework's input map (no framework import).

TorchServe hands a handler one dict per request: for gRPC the `PredictionsRequest.input` map
(every value bytes), for REST multipart/form-data one entry per form field (bytes for files, str
for text fields, an already-parsed dict for `application/json` parts). The schema is documented in
`morph_protocol/wire.py`; every violation raises ConfigError with a message naming the field
(and its `field` attribute set to it, so the OIP path can name the tensor instead).
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from morph_protocol import limits, wire
from morph_protocol.formats import WEBP
from diffmorpher.config import FIELD, ConfigError, MorphConfig, OutputOptions, name_list, show, with_preset

OUTPUT_KEYS = ("format", "frame_duration_ms", "loop", *OutputOptions.WEBP_OPTIONS)
# Chosen by the server (they follow from how the pipeline was loaded), never by a request.
SERVER_KEYS = ("device", "dtype")
# Raster formats only: Pillow would open PostScript (EPS) by running Ghostscript.
# (JPEG covers MPO, the multi-picture JPEG of phone cameras; AVIF where Pillow was built with it.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# Tabs and newlines are prompt text; NUL, escapes and other C0/C1 controls are refused.
PROMPT_CONTROLS_ALLOWED = "\t\n\r"
_IMAGE_SIDE = math.isqrt(limits.MAX_IMAGE_PIXELS)  # the largest square image, for messages
_IMAGE_KEY = re.compile(r"image_(?:ref_)?(0|[1-9][0-9]{0,5})")
_IMAGE_REF = re.compile(r"[0-9a-f]{%d}" % wire.IMAGE_REF_LENGTH)


@dataclass
class MorphRequest:
    images: list[Image.Image | wire.ImageRef]  # references are resolved from the server's cache
    prompts: list[str]
    config: MorphConfig
    outputs: list[OutputOptions]  # one per requested format, same duration/loop
    stream: bool
    # Per endpoint (an image, or one made from one image for prompt i), a LoRA sent instead of
    # fitted (`lora_<i>`, safetensors bytes, size-checked here; checked against the served UNet
    # by the core's read_lora), or None.
    loras: list[bytes | None] = field(default_factory=list)

    @property
    def formats(self) -> list[str]:
        return [o.format for o in self.outputs]


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ConfigError(f"{FIELD} must be bytes, got {type(value).__name__}", field=name)


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return _as_bytes(name, value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{FIELD} must be UTF-8 text: {error}", field=name) from error


def decode_image(name: str, value: Any) -> Image.Image:
    """An upright RGB image from encoded bytes (PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF),
    size-checked from its header before any pixel is decoded. Animated images give their first
    frame; EXIF orientation is applied; transparent areas are put on white; 16-bit images are
    scaled to 8 bits."""
    data = _as_bytes(name, value)
    if not data:
        raise ConfigError(f"{FIELD} is empty; expected an encoded image (PNG, JPEG, WebP)", field=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_image_formats())
            if image.width * image.height > limits.MAX_IMAGE_PIXELS:
                raise _too_many_pixels(name, f"{image.width}x{image.height}")
            image.load()
            return _to_rgb(_upright(image))
    except ConfigError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_many_pixels(name, str(error)) from error
    except UnidentifiedImageError as error:
        raise ConfigError(
            f"{FIELD} is not a readable image ({len(data)} bytes starting {data[:8]!r}); "
            f"send PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF", field=name,
        ) from error
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a decoder tripping over client bytes is a 400
        raise ConfigError(f"{FIELD} is a damaged or truncated image: {error}", field=name) from error


def _image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow can open (Image.open fails on a name it does not know)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _too_many_pixels(name: str, size: str) -> ConfigError:
    return ConfigError(
        f"{FIELD} exceeds the image size limit of {limits.MAX_IMAGE_PIXELS} pixels ({size}); "
        f"send at most {_IMAGE_SIDE}x{_IMAGE_SIDE}", field=name,
    )


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen (EXIF/XMP orientation applied); unreadable orientation
    metadata is dropped rather than failing the request, so later stages cannot trip on it."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - metadata, not pixels
        upright = image.copy()
    upright.info.pop("exif", None)
    upright.info.pop("xmp", None)
    return upright


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit integer or float grey levels: convert("RGB") would clip them to white.
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and array.size and array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = image.convert("RGB")
    rgb.info.clear()
    return rgb


def parse_options(value: Any) -> dict[str, Any]:
    """The `options` field as a dict: a JSON object of at most limits.MAX_OPTIONS_BYTES with finite
    numbers and no key twice (or the dict a REST `application/json` part was parsed into)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        options = dict(value)
    else:
        data = _as_bytes(wire.INPUT_OPTIONS, value)
        if len(data) > limits.MAX_OPTIONS_BYTES:
            raise _options_error(f"{FIELD} is {len(data)} bytes; at most {limits.MAX_OPTIONS_BYTES}")
        text = _as_text(wire.INPUT_OPTIONS, data).strip()
        if not text:
            return {}
        try:
            options = json.loads(text, object_pairs_hook=_unique_keys)
        except ConfigError:
            raise
        except RecursionError as error:
            raise _options_error(f"{FIELD} is nested too deeply; send a flat JSON object") from error
        except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
            raise _options_error(f"{FIELD} is not valid JSON: {str(error)[:200]}") from error
    if not isinstance(options, dict):
        raise _options_error(f"{FIELD} must be a JSON object, got {type(options).__name__}")
    for key, option in options.items():
        if not isinstance(key, str):
            raise _options_error(f"{FIELD} has a key that is not a string: {show(key)}")
        if not _finite(option):
            raise ConfigError(
                f"option {key!r} must be a finite number; NaN and Infinity are not allowed"
            )
    return options


def _options_error(message: str) -> ConfigError:
    """An error about the `options` field (FIELD marks where the message names it)."""
    return ConfigError(message, field=wire.INPUT_OPTIONS)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: two parsers may keep different copies of a repeated key, so refuse it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _options_error(f"{FIELD} has key {show(key)} twice")
        result[key] = value
    return result


def _finite(value: Any) -> bool:
    """No NaN or infinite float anywhere in a parsed JSON value (walked without recursion)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, Mapping):
            pending.extend(item.values())
    return True


def _check_prompt(key: str, value: Any) -> str:
    """A prompt's text: at most limits.MAX_PROMPT_CHARS (a huge field is refused by its byte
    length, before decoding), with no control characters but tabs and newlines."""
    limit = f"at most {limits.MAX_PROMPT_CHARS} characters"
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > limits.MAX_PROMPT_BYTES:
        raise ConfigError(f"{FIELD} is {len(value)} bytes; {limit}", field=key, kind="prompt")
    prompt = _as_text(key, value)
    if len(prompt) > limits.MAX_PROMPT_CHARS:
        raise ConfigError(f"{FIELD} is {len(prompt)} characters; {limit}", field=key, kind="prompt")
    for position, char in enumerate(prompt):
        if unicodedata.category(char) == "Cc" and char not in PROMPT_CONTROLS_ALLOWED:
            raise ConfigError(
                f"{FIELD} contains control character U+{ord(char):04X} at position "
                f"{position}; send plain text (tabs and newlines are fine)", field=key, kind="prompt",
            )
    return prompt


def parse_stream(value: Any) -> bool:
    if value is None:
        return False
    text = _as_text(wire.INPUT_STREAM, value).strip().lower()
    if text in wire.STREAM_TRUE:
        return True
    if text in wire.STREAM_FALSE:
        return False
    raise ConfigError(f"{FIELD} must be true or false, got {text[:20]!r}", field=wire.INPUT_STREAM)


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
        raise ConfigError(
            f"format must be a name or a non-empty list of names, got {show(formats)}"
        )
    if len(set(formats)) != len(formats):
        raise ConfigError(f"format lists a format twice: {show(formats)}")
    _check_webp_options(output, formats)
    # One dict, not **options: an option named like a parameter ("options") must be "unknown".
    # A preset overrides the server's defaults; the request's own options override the preset.
    config = MorphConfig.from_dict({**defaults.to_dict(), **with_preset(options)})
    outputs = [OutputOptions(format=f, **output) for f in formats]
    return config, outputs


def _check_webp_options(output: Mapping[str, Any], formats: list[str]) -> None:
    """WebP's options name a WebP: refused without one, and the lossy quality refused beside
    `webp_lossless: true`, rather than read by nothing."""
    sent = [key for key in OutputOptions.WEBP_OPTIONS if key in output]
    if sent and WEBP not in formats:
        raise ConfigError(
            f"option(s) {name_list(sent)} apply to the webp format only, and the request asks for "
            f"{show(formats)}; add \"webp\" to format or remove them"
        )
    if "webp_quality" in output and output.get("webp_lossless") is True:
        raise ConfigError(
            "webp_quality sets lossy WebP's quality and the request asks for lossless WebP "
            "(webp_lossless: true); send one of the two"
        )


def parse_request(data: Mapping[str, Any], defaults: MorphConfig) -> MorphRequest:
    """Validate and decode one request's input map."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"request must be a map of fields, got {type(data).__name__}")
    fields = dict(data)
    count = 0
    while wire.image_key(count) in fields or wire.image_ref_key(count) in fields:
        count += 1
    # image_0, image_2 without image_1: name the gap, not "only 1 image" or "unknown field".
    beyond = sorted(
        (key for key in fields
         if isinstance(key, str) and (match := _IMAGE_KEY.fullmatch(key)) and int(match.group(1)) > count),
        key=lambda key: int(_IMAGE_KEY.fullmatch(key).group(1)),  # type: ignore[union-attr]
    )
    if beyond:
        raise ConfigError(
            f"unknown field(s) {name_list(beyond)}: images are numbered image_0, image_1, ... "
            f"(or image_ref_0, ...) without gaps, and {wire.image_key(count)!r} is missing"
        )
    num_prompts = count
    if count == 1:  # one image and K >= 2 prompts: the server makes the other endpoints
        while wire.prompt_key(num_prompts) in fields and num_prompts <= limits.MAX_ONE_IMAGE_PROMPTS:
            num_prompts += 1
    if count < limits.MIN_IMAGES and num_prompts < limits.MIN_ONE_IMAGE_PROMPTS:
        body_hint = (
            " (REST requests must be multipart/form-data, e.g. curl -F image_0=@a.png ...)"
            if "body" in fields or "data" in fields else ""
        )
        raise ConfigError(
            f"a morph needs at least 2 images in fields image_0, image_1, ..., or one image and at "
            f"least {limits.MIN_ONE_IMAGE_PROMPTS} prompts (prompt_0, prompt_1, ...); got {count} image(s)"
            f"{body_hint}. Fields received: {name_list(sorted(map(str, fields)), 20)}"
        )
    if count > limits.MAX_IMAGES:
        raise ConfigError(f"at most {limits.MAX_IMAGES} images per morph, got {count}")
    if num_prompts > limits.MAX_ONE_IMAGE_PROMPTS:
        raise ConfigError(f"one image takes at most {limits.MAX_ONE_IMAGE_PROMPTS} prompts, got more")
    prompts = []
    for index in range(num_prompts):
        key = wire.prompt_key(index)
        if key not in fields:
            raise ConfigError(f"missing {FIELD} for image {index}: send one prompt per image", field=key, kind="prompt")
        prompts.append(_check_prompt(key, fields[key]))
    expected = {wire.image_key(i) for i in range(count)} | {wire.prompt_key(i) for i in range(num_prompts)}
    expected |= {wire.image_ref_key(i) for i in range(count)} | {wire.lora_key(i) for i in range(num_prompts)}
    expected |= {wire.INPUT_OPTIONS, wire.INPUT_STREAM, wire.INPUT_DEADLINE, wire.INPUT_CALL_ID}
    unknown = sorted(set(fields) - expected)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {name_list(unknown)}; expected image_0..image_{count - 1} (or "
            f"image_ref_<i> in place of image_<i>), "
            f"prompt_0..prompt_{num_prompts - 1}, lora_<i> (optional), options, stream, deadline"
        )
    config, outputs = split_options(parse_options(fields.get(wire.INPUT_OPTIONS)), defaults)
    stream = parse_stream(fields.get(wire.INPUT_STREAM))
    images = [_image_or_reference(fields, i) for i in range(count)]
    loras = [_sent_lora(fields, i) for i in range(num_prompts)]  # one per endpoint, made ones too
    return MorphRequest(images, prompts, config, outputs, stream, loras)


def _sent_lora(fields: Mapping[str, Any], index: int) -> bytes | None:
    """The bytes of a LoRA sent for image `index` (`lora_<i>`), at most limits.MAX_LORA_BYTES;
    what they hold is checked against the served model by the core (lora_file.read_lora)."""
    name = wire.lora_key(index)
    if name not in fields:
        return None
    data = _as_bytes(name, fields[name])
    if not data:
        raise ConfigError(f"{FIELD} is empty; send a LoRA as safetensors or leave the field out", field=name)
    if len(data) > limits.MAX_LORA_BYTES:
        raise ConfigError(f"{FIELD} is {len(data)} bytes; a LoRA may have at most {limits.MAX_LORA_BYTES} "
                          f"bytes (limits.MAX_LORA_BYTES)", field=name)
    return data


def _image_or_reference(fields: Mapping[str, Any], index: int) -> Image.Image | wire.ImageRef:
    """Image `index`: its bytes (`image_<i>`) or the key of an image the server kept from an
    earlier morph (`image_ref_<i>`), not both."""
    name, ref_name = wire.image_key(index), wire.image_ref_key(index)
    if name in fields and ref_name in fields:
        raise ConfigError(f"send either {name!r} or {ref_name!r}, not both")
    if name in fields:
        return decode_image(name, fields[name])
    value = fields[ref_name]
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 2 * wire.IMAGE_REF_LENGTH:
        raise ConfigError(f"{FIELD} is {len(value)} bytes; an image_key has {wire.IMAGE_REF_LENGTH} hex digits", field=ref_name)
    key = _as_text(ref_name, value).strip().lower()
    if not _IMAGE_REF.fullmatch(key):
        raise ConfigError(
            f"{FIELD} must be the {wire.IMAGE_REF_LENGTH}-hex-digit image_key of a previous "
            f"result, got {show(key)}", field=ref_name,
        )
    return wire.ImageRef(key)
