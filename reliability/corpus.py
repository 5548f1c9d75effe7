"""Hostile and edge-case morph requests, generated in memory, each with its expected outcome.

Every case is a TorchServe input map (`image_0..`, `prompt_0..`, `options`, `stream`, all bytes)
plus what the service must answer: `ok`, `invalid` (HTTP 400 / gRPC INVALID_ARGUMENT),
`too_large` (HTTP 413 / gRPC RESOURCE_EXHAUSTED) or `unauthenticated` (gRPC PERMISSION_DENIED,
HTTP 401/403), and for errors a substring the server's message must contain. Nothing is
committed as a binary: images are drawn with Pillow, hostile files are built by patching valid
ones. Standard library, Pillow, numpy and `morph_protocol` only, so load tests and clients can use
it without torch or the handler.

    python -m reliability.corpus --out DIR   # a folder per case: its fields as files, expect.json

Decisions documented by the cases (the handler enforces them in handler/morph_request.py):
- Animated images (GIF, APNG, WebP): the first frame is morphed.
- EXIF orientation is applied: a phone photo is morphed upright.
- Transparent areas are put on white; 16-bit images are scaled to 8 bits; any size is resized.
- Accepted formats: PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF. Others (PostScript, SVG, ...) are
  refused even where Pillow could open them (EPS would run Ghostscript).
- An empty prompt is fine (it is Stable Diffusion's unconditional prompt); tabs and newlines are
  fine; NUL and other control characters are refused (no meaning to the text encoder, and a
  classic way to truncate or forge log lines downstream).
- JSON options must be plain: no NaN/Infinity, no number that overflows to infinity, no key twice
  (two parsers could pick different values), no nesting deeper than the JSON parser allows, at
  most 64 KiB.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from morph_protocol import limits, wire

OK = "ok"
INVALID = "invalid"
TOO_LARGE = "too_large"
UNAUTHENTICATED = "unauthenticated"
EXPECTATIONS = (OK, INVALID, TOO_LARGE, UNAUTHENTICATED)
TRANSPORTS = ("unary", "stream", "rest")
TOKENS = ("valid", None, "wrong")


SIZE = 64
RED = (220, 30, 30)
BLUE = (30, 60, 220)
WHITE = (255, 255, 255)
PROMPTS = ("a red circle on a white background", "a blue square on a white background")
# The EXIF case: upright, the image is 64 wide and 48 high with a red block in its top-left corner.
EXIF_UPRIGHT_SIZE = (64, 48)
EXIF_CORNER = 16
EXIF_CASE = "exif_rotated_jpeg"


@dataclass(frozen=True)
class Case:
    """One request and the outcome the service owes it."""

    name: str
    fields: dict[str, bytes]
    expect: str
    message: str = ""
    transports: tuple[str, ...] = TRANSPORTS
    token: str | None = "valid"
    note: str = ""

    def __post_init__(self) -> None:
        if self.expect not in EXPECTATIONS:
            raise ValueError(
                f"case {self.name}: expect must be one of {EXPECTATIONS}, got {self.expect!r}"
            )
        if self.expect == OK and self.message or self.expect == INVALID and not self.message:
            raise ValueError(
                f"case {self.name}: an ok case has no message, an invalid one needs one"
            )
        if not self.transports or not set(self.transports) <= set(TRANSPORTS):
            raise ValueError(
                f"case {self.name}: transports must be a non-empty subset of {TRANSPORTS}"
            )
        if self.token not in TOKENS:
            raise ValueError(f"case {self.name}: token must be one of {TOKENS}")


# ---------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def circle(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    image = Image.new("RGB", size, WHITE)
    width, height = size
    ImageDraw.Draw(image).ellipse(
        (width // 8, height // 8, width * 7 // 8, height * 7 // 8), fill=colour
    )
    return image


def square(
    colour: tuple[int, int, int] = BLUE, size: tuple[int, int] = (SIZE, SIZE)
) -> Image.Image:
    image = Image.new("RGB", size, WHITE)
    width, height = size
    ImageDraw.Draw(image).rectangle(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=colour
    )
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (CRC fixed up) claims width x height: a decompression bomb's
    header, refused before any pixel is decoded."""
    data = bytearray(encode(circle()))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack("!II", width, height)
    data[29:33] = struct.pack("!I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 marker claims width x height."""
    data = bytearray(encode(circle(), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack("!HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A small GIF whose logical screen claims width x height."""
    data = bytearray(encode(circle().convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [circle(RED).quantize(16), square(BLUE).quantize(16), circle(BLUE).quantize(16)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(circle(RED).convert("CMYK"), "JPEG", quality=90)


def png_16bit() -> bytes:
    """A 16-bit grayscale PNG (Pillow mode I;16): a dark disc on a light ramp."""
    ramp = np.tile(np.linspace(20000, 65535, SIZE), (SIZE, 1))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ramp[(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 3) ** 2] = 4000
    image = Image.fromarray(ramp.astype(np.uint16))
    assert image.mode == "I;16", image.mode
    return encode(image)


def palette_png(transparent: bool = False) -> bytes:
    image = square(BLUE).quantize(8)
    if not transparent:
        return encode(image)
    white = image.getpixel((0, 0))
    return encode(image, transparency=white)


def rgba_png() -> bytes:
    """A red disc on a fully transparent background (whose colour channels are black)."""
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=(*RED, 255))
    return encode(image)


def exif_rotated_jpeg() -> bytes:
    """Stored rotated by 90 degrees with EXIF orientation 6 ("rotate 90 clockwise to view"), as
    phones save portrait photos. Upright it is EXIF_UPRIGHT_SIZE with a red block of
    EXIF_CORNER pixels in the top-left corner."""
    upright = Image.new("RGB", EXIF_UPRIGHT_SIZE, WHITE)
    ImageDraw.Draw(upright).rectangle((0, 0, EXIF_CORNER - 1, EXIF_CORNER - 1), fill=RED)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
    b"1 0 0 setrgbcolor 32 32 24 0 360 arc fill\nshowpage\n%%EOF\n"
)
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<circle cx="32" cy="32" r="24" fill="red"/></svg>'
)


# ---------------------------------------------------------------------- requests
def _options(options: dict[str, Any]) -> bytes:
    return json.dumps(options).encode("utf-8")


def request(
    images: list[bytes] | None = None,
    prompts: list[str | bytes] | None = None,
    options: dict[str, Any] | bytes | None = None,
    **extra: bytes,
) -> dict[str, bytes]:
    """An input map: images and prompts numbered from 0, options as JSON bytes, extra fields as
    given."""
    images = [encode(circle()), encode(square())] if images is None else images
    prompts = list(PROMPTS[: len(images)]) if prompts is None else prompts
    fields: dict[str, bytes] = {}
    for index, image in enumerate(images):
        fields[wire.image_key(index)] = image
    for index, prompt in enumerate(prompts):
        fields[wire.prompt_key(index)] = (
            prompt.encode("utf-8") if isinstance(prompt, str) else prompt
        )
    if options is not None:
        fields[wire.INPUT_OPTIONS] = options if isinstance(options, bytes) else _options(options)
    fields.update(extra)
    return fields


def build_corpus(base_options: dict, *, include_huge: bool = False) -> list[Case]:
    """Every case; "ok" ones use `base_options` (small morph options, so they run fast).
    `include_huge` adds a request over the frontend's max_request_size (limits.MAX_REQUEST_BYTES;
    it costs as much memory)."""
    base = dict(base_options)
    circle_png, square_png = encode(circle()), encode(square())
    cases: list[Case] = []

    def ok(name: str, note: str, fields: dict[str, bytes] | None = None, **kw: Any) -> None:
        cases.append(
            Case(
                name,
                fields if fields is not None else request(options=base),
                OK,
                "",
                note=note,
                **kw,
            )
        )

    def invalid(name: str, message: str, note: str, fields: dict[str, bytes], **kw: Any) -> None:
        cases.append(Case(name, fields, INVALID, message, note=note, **kw))

    def bad_option(name: str, options: dict[str, Any] | bytes, message: str, note: str) -> None:
        if isinstance(options, dict):
            options = {**base, **options}
        invalid(name, message, note, request(options=options))

    pixel_limit = f"exceeds the image size limit of {limits.MAX_IMAGE_PIXELS} pixels"

    # --- well-formed requests
    ok("baseline", "two small PNGs with prompts: the reference every other case departs from")
    ok(
        "three_images",
        "three images make two segments",
        request(
            [circle_png, square_png, encode(circle(BLUE))],
            [*PROMPTS, "a blue circle on a white background"],
            base,
        ),
    )
    ok(
        "several_formats",
        "one morph encoded twice",
        request(options={**base, "format": ["gif", "png"]}),
    )
    ok(
        "stream_on_stream_call",
        "streaming asked for on StreamPredictions, where it belongs",
        request(options=base, stream=b"true"),
        transports=("stream",),
    )
    ok(
        "stream_false_on_unary",
        "an explicit stream=false is the unary default",
        request(options=base, stream=b"false"),
    )

    # --- images: damaged, empty, foreign
    invalid(
        "non_image_bytes",
        "field 'image_0' is not a readable image",
        "text where an image belongs",
        request([b"this is not an image, just text", square_png], options=base),
    )
    invalid(
        "png_signature_only",
        "field 'image_1' is not a readable image",
        "8 bytes of PNG signature and nothing else",
        request([circle_png, square_png[:8]], options=base),
    )
    invalid(
        "truncated_png",
        "field 'image_1' is a damaged or truncated image",
        "upload cut off halfway",
        request([circle_png, square_png[: len(square_png) // 2]], options=base),
    )
    jpeg = encode(circle(), "JPEG", quality=90)
    invalid(
        "truncated_jpeg",
        "field 'image_0' is a damaged or truncated image",
        "upload cut off halfway",
        request([jpeg[: len(jpeg) // 2], square_png], options=base),
    )
    invalid(
        "empty_image",
        "field 'image_0' is empty",
        "an empty file field",
        request([b"", square_png], options=base),
    )
    invalid(
        "postscript_image",
        "field 'image_0' is not a readable image",
        "EPS: Pillow would hand it to Ghostscript; only raster formats are accepted",
        request([EPS, square_png], options=base),
    )
    invalid(
        "svg_image",
        "field 'image_1' is not a readable image",
        "a vector format the server does not render",
        request([circle_png, SVG], options=base),
    )

    # --- images: sizes, bombs
    ok(
        "tiny_1x1_image",
        "a 1x1 image is resized like any other",
        request([encode(Image.new("RGB", (1, 1), RED)), square_png], options=base),
    )
    ok(
        "mismatched_sizes",
        "images of different sizes and aspect ratios are each centre-cropped and resized",
        request([encode(circle(size=(200, 120))), encode(square(size=(48, 64)))], options=base),
    )
    invalid(
        "png_bomb_30000x30000",
        f"field 'image_1' {pixel_limit}",
        "a few hundred bytes claiming 900 Mpixel: refused from the header, nothing decoded",
        request([circle_png, png_claiming(30000, 30000)], options=base),
    )
    invalid(
        "png_bomb_10000x10000",
        f"field 'image_0' {pixel_limit}",
        "100 Mpixel: over Pillow's warning threshold but under its hard limit",
        request([png_claiming(10000, 10000), square_png], options=base),
    )
    invalid(
        "png_header_5000x4000",
        f"field 'image_0' {pixel_limit}",
        "20 Mpixel: under Pillow's limits, over the service's 16 Mpixel",
        request([png_claiming(5000, 4000), square_png], options=base),
    )
    invalid(
        "jpeg_bomb_65000x65000",
        f"field 'image_0' {pixel_limit}",
        "a JPEG SOF marker claiming 4 Gpixel",
        request([jpeg_claiming(65000, 65000), square_png], options=base),
    )
    invalid(
        "gif_bomb_65535x65535",
        f"field 'image_1' {pixel_limit}",
        "a GIF logical screen claiming 4 Gpixel",
        request([circle_png, gif_claiming(65535, 65535)], options=base),
    )

    # --- images: modes and containers that must decode to an upright RGB picture
    ok(
        "animated_gif",
        "an animated GIF: its first frame is morphed",
        request([animated_gif(), square_png], options=base),
    )
    ok("cmyk_jpeg", "print-shop CMYK JPEG", request([cmyk_jpeg(), square_png], options=base))
    ok(
        "png_16bit_grayscale",
        "16-bit PNG (mode I;16): scaled to 8 bits, not clipped to white",
        request([png_16bit(), square_png], options=base),
    )
    ok("palette_png", "palette (P mode) PNG", request([circle_png, palette_png()], options=base))
    ok(
        "palette_png_transparency",
        "palette PNG with a transparent colour (tRNS): transparent areas become white",
        request([circle_png, palette_png(transparent=True)], options=base),
    )
    ok(
        "rgba_png_transparent",
        "RGBA with a transparent (black-valued) background: put on white, not black",
        request([rgba_png(), square_png], options=base),
    )
    ok(
        "grayscale_png",
        "mode L",
        request([encode(circle().convert("L")), square_png], options=base),
    )
    ok(
        EXIF_CASE,
        "phone portrait photo, stored sideways with EXIF orientation 6: morphed upright",
        request([exif_rotated_jpeg(), square_png], options=base),
    )
    ok(
        "webp_image",
        "WebP",
        request([encode(circle(), "WEBP", quality=90), square_png], options=base),
    )

    # --- prompts
    invalid(
        "missing_prompt",
        "missing prompt 'prompt_1'",
        "two images, one prompt",
        request(prompts=[PROMPTS[0]], options=base),
    )
    ok(
        "empty_prompt",
        "an empty prompt is Stable Diffusion's unconditional prompt: allowed",
        request(prompts=["", PROMPTS[1]], options=base),
    )
    ok(
        "multiline_unicode_prompt",
        "newlines, tabs and non-ASCII text are ordinary prompt text",
        request(
            prompts=["a red circle\non a white background\t☀", "ein blauer Würfel – 青い四角"],
            options=base,
        ),
    )
    invalid(
        "prompt_not_utf8",
        "field 'prompt_0' must be UTF-8 text",
        "Latin-1 bytes where UTF-8 is required",
        request(prompts=[b"a red circle\xe9\xff", PROMPTS[1]], options=base),
    )
    invalid(
        "prompt_over_limit",
        f"prompt 'prompt_0' is {limits.MAX_PROMPT_CHARS + 1} characters",
        "one character over the prompt limit",
        request(prompts=["a" * (limits.MAX_PROMPT_CHARS + 1), PROMPTS[1]], options=base),
    )
    invalid(
        "prompt_5mb",
        f"prompt 'prompt_1' is {5 * 1024 * 1024} bytes",
        "an oversized field is refused by its byte length, before it is decoded",
        request(prompts=[PROMPTS[0], b"x" * (5 * 1024 * 1024)], options=base),
    )
    invalid(
        "prompt_with_nul",
        "prompt 'prompt_0' contains control character U+0000",
        "NUL truncates C strings and log lines downstream",
        request(prompts=["a red circle\x00 on white", PROMPTS[1]], options=base),
    )
    invalid(
        "prompt_with_terminal_escape",
        "prompt 'prompt_1' contains control character U+001B",
        "ANSI escapes would repaint an operator's terminal when the prompt is logged",
        request(prompts=[PROMPTS[0], "a blue square\x1b[2J"], options=base),
    )

    # --- fields
    invalid(
        "one_image",
        "a morph needs at least 2 images",
        "nothing to morph between",
        request([circle_png], options=base),
    )
    invalid(
        "zero_images",
        "a morph needs at least 2 images",
        "prompts only",
        request([], prompts=list(PROMPTS), options=base),
    )
    invalid(
        "image_index_gap",
        "unknown field(s) ['image_2']",
        "image_0 and image_2 without image_1: the message names the gap, not 'only 1 image'",
        {
            wire.image_key(0): circle_png,
            wire.image_key(2): square_png,
            wire.prompt_key(0): PROMPTS[0].encode(),
            wire.prompt_key(2): PROMPTS[1].encode(),
            wire.INPUT_OPTIONS: _options(base),
        },
    )
    over = limits.MAX_IMAGES + 1
    invalid(
        "too_many_images",
        f"at most {limits.MAX_IMAGES} images per morph, got {over}",
        "one image over the limit",
        request(
            [(circle_png, square_png)[index % 2] for index in range(over)],
            [PROMPTS[index % 2] for index in range(over)],
            base,
        ),
    )
    invalid(
        "unknown_field",
        "unknown field(s) ['negative_prompt']",
        "a field the service does not have",
        request(options=base, negative_prompt=b"blurry"),
    )
    invalid(
        "prompt_without_image",
        "unknown field(s) ['prompt_2']",
        "three prompts for two images",
        request(prompts=[*PROMPTS, "a green triangle"], options=base),
    )
    invalid(
        "ten_thousand_unknown_fields",
        "(10000 in all)",
        "the error message stays short however many fields are sent",
        request(options=base, **{f"field_{i:05d}": b"x" for i in range(10000)}),
    )

    # --- options: shape of the JSON
    bad_option(
        "unknown_option",
        {"strength": 0.8},
        "unknown option(s) ['strength']",
        "an option the service does not have",
    )
    bad_option(
        "option_named_options",
        {"options": {}},
        "unknown option(s) ['options']",
        "an option whose name collides with a Python parameter name must still be 'unknown'",
    )
    bad_option(
        "options_not_json",
        b"{num_frames: 2}",
        "field 'options' is not valid JSON",
        "JavaScript, not JSON",
    )
    bad_option(
        "options_json_list",
        b"[2, 1, 2]",
        "field 'options' must be a JSON object, got list",
        "a list, not an object",
    )
    bad_option(
        "options_json_number",
        b"42",
        "field 'options' must be a JSON object, got int",
        "a number, not an object",
    )
    bad_option(
        "options_not_utf8",
        b'{"format": "gif\xff"}',
        "field 'options' must be UTF-8 text",
        "invalid UTF-8",
    )
    bad_option(
        "options_nan_infinity",
        json.dumps({**base, "attn_lambda": float("nan"), "lora_lr": float("inf")}).encode(),
        "option 'attn_lambda' must be a finite number",
        "Python's json writes and reads NaN/Infinity, which are not JSON; refused at parse time",
    )
    bad_option(
        "options_number_overflows_to_infinity",
        json.dumps(base)[:-1].encode() + b', "lora_lr": 1e999}',
        "option 'lora_lr' must be a finite number",
        "1e999 is valid JSON syntax but parses to infinity",
    )
    bad_option(
        "options_5000_digit_integer",
        json.dumps(base)[:-1].encode() + b', "seed": ' + b"9" * 5000 + b"}",
        "field 'options' is not valid JSON",
        "Python refuses int parsing over 4300 digits with ValueError, which must not become a 500",
    )
    bad_option(
        "options_duplicate_key",
        b'{"num_frames": 2, "num_frames": 100000}',
        "field 'options' has key 'num_frames' twice",
        "parsers disagree on duplicate keys (first wins vs last wins): refuse, don't pick",
    )
    bad_option(
        "options_deeply_nested",
        b'{"format": ' + b"[" * 10000 + b"]" * 10000 + b"}",
        "field 'options' is nested too deeply",
        "10000 nested lists: a RecursionError inside the JSON parser must become a 400",
    )
    long_options = b" " * (1024 * 1024) + b"{}"
    bad_option(
        "options_1mb_of_whitespace",
        long_options,
        f"field 'options' is {len(long_options)} bytes",
        "1 MiB of whitespace: refused by size before parsing",
    )

    # --- options: values
    for name, value in (("0", 0), ("1", 1), ("negative", -1), ("huge", 10**9)):
        bad_option(
            f"num_frames_{name}",
            {"num_frames": value},
            "num_frames must be between 2 and 256",
            "frame count out of range: refused before any work",
        )
    for name, value in (("float", 2.5), ("string", "4"), ("bool", True), ("null", None)):
        bad_option(
            f"num_frames_{name}",
            {"num_frames": value},
            "num_frames must be an integer",
            f"{json.dumps(value)} is not an integer (bool is not an int here)",
        )
    bad_option("seed_negative", {"seed": -1}, "seed must be between 0 and", "seeds are unsigned")
    bad_option(
        "seed_huge", {"seed": 2**64}, "seed must be between 0 and", "over a 64-bit generator seed"
    )
    bad_option("seed_float", {"seed": 1.5}, "seed must be an integer", "fractional seed")
    bad_option(
        "resolution_not_multiple_of_8",
        {"resolution": 100},
        "resolution must be a multiple of 8",
        "VAE needs multiples of 8",
    )
    bad_option(
        "resolution_zero", {"resolution": 0}, "resolution must be between 8 and", "zero pixels"
    )
    bad_option(
        "resolution_huge",
        {"resolution": 10**6},
        "resolution must be between 8 and",
        "would exhaust GPU memory",
    )
    bad_option(
        "lora_steps_negative",
        {"lora_steps": -5},
        f"lora_steps must be between 0 and {limits.MAX_LORA_STEPS}",
        "negative steps",
    )
    bad_option(
        "lora_steps_huge",
        {"lora_steps": 10**7},
        f"lora_steps must be between 0 and {limits.MAX_LORA_STEPS}",
        "hours of LoRA fitting",
    )
    bad_option(
        "num_inference_steps_zero",
        {"num_inference_steps": 0},
        "num_inference_steps must be between 1 and 1000",
        "no denoising step",
    )
    bad_option(
        "num_inference_steps_huge",
        {"num_inference_steps": 10**6},
        "num_inference_steps must be between 1 and 1000",
        "hours of denoising",
    )
    bad_option(
        "attn_lambda_negative",
        {"attn_lambda": -0.1},
        "attn_lambda must be in [0.0, 1.0]",
        "below the range",
    )
    bad_option(
        "attn_lambda_over_one",
        {"attn_lambda": 1.5},
        "attn_lambda must be in [0.0, 1.0]",
        "above the range",
    )
    bad_option(
        "attn_lambda_nan",
        b'{"attn_lambda": NaN}',
        "option 'attn_lambda' must be a finite number",
        "NaN compares false with every bound, so range checks alone let it through",
    )
    bad_option(
        "use_lora_string",
        {"use_lora": "yes"},
        "use_lora must be true or false",
        "a string is not a bool",
    )
    bad_option(
        "frame_batch_size_huge",
        {"frame_batch_size": 100000},
        "frame_batch_size must be between 0 and 64",
        "would exhaust GPU memory",
    )
    bad_option(
        "format_unknown",
        {"format": "webm"},
        "format must be one of",
        "a format the service cannot encode",
    )
    bad_option(
        "format_empty_list",
        {"format": []},
        "format must be a name or a non-empty list",
        "no format at all",
    )
    bad_option(
        "format_duplicated",
        {"format": ["gif", "png", "gif"]},
        "format lists a format twice",
        "the same encoding twice",
    )
    bad_option(
        "frame_duration_zero",
        {"frame_duration_ms": 0},
        "frame_duration_ms must be between 10 and",
        "zero-length frames",
    )
    bad_option(
        "frame_duration_negative",
        {"frame_duration_ms": -100},
        "frame_duration_ms must be between 10 and",
        "negative duration",
    )
    bad_option(
        "loop_string", {"loop": "forever"}, "loop must be true or false", "a string is not a bool"
    )
    bad_option(
        "webp_quality_over_range",
        {"format": "webp", "webp_quality": 101},
        "webp_quality must be between 0 and 100",
        "libwebp's quality scale ends at 100",
    )
    bad_option(
        "webp_quality_without_webp",
        {"format": "gif", "webp_quality": 50},
        "apply to the webp format only",
        "a WebP option that no requested format reads",
    )
    bad_option(
        "webp_quality_with_lossless",
        {"format": "webp", "webp_quality": 50, "webp_lossless": True},
        "webp_quality sets lossy WebP's quality",
        "a lossy quality for a lossless WebP",
    )
    bad_option(
        "device_option",
        {"device": "cuda:7"},
        "option 'device' is set by the server",
        "clients must not pick the GPU",
    )
    bad_option(
        "dtype_option",
        {"dtype": "float64"},
        "option 'dtype' is set by the server",
        "clients must not pick the precision",
    )

    # --- stream flag
    invalid(
        "stream_true_on_unary",
        "StreamPredictions",
        "intermediate responses on a unary call kill the TorchServe 0.12 worker; the handler "
        "cannot see the RPC, so the gateway refuses this",
        request(options=base, stream=b"true"),
        transports=("unary",),
    )
    invalid(
        "stream_maybe",
        "field 'stream' must be true or false",
        "neither true nor false",
        request(options=base, stream=b"maybe"),
    )
    # --- a LoRA sent instead of fitted (lora_<i>): what the parser refuses before the model
    # (shapes, keys and rank are checked against the served UNet by the core: test_lora_file)
    invalid(
        "lora_empty",
        "field 'lora_0' is empty",
        "an empty LoRA field is a mistake, not a request to fit",
        request(options=base, lora_0=b""),
    )
    invalid(
        "lora_for_no_image",
        "unknown field(s) ['lora_2']",
        "a LoRA for an image the request does not have",
        request(options=base, lora_2=b"x"),
    )

    # --- authentication (fields are the valid baseline)
    cases.append(
        Case(
            "no_token",
            request(options=base),
            UNAUTHENTICATED,
            "Token Authorization failed",
            token=None,
            note="no bearer token: refused by the frontend before the worker",
        )
    )
    cases.append(
        Case(
            "wrong_token",
            request(options=base),
            UNAUTHENTICATED,
            "Token Authorization failed",
            token="wrong",
            note="a wrong bearer token",
        )
    )

    if include_huge:
        big = limits.MAX_REQUEST_BYTES + limits.MiB
        cases.append(
            Case(
                "request_over_max_request_size",
                request([b"\0" * big, square_png], options=base),
                TOO_LARGE,
                note="over config.properties max_request_size: refused by the frontend (gRPC and "
                "REST word it differently, so no message is required)",
            )
        )
    return cases


# ---------------------------------------------------------------------- on disk
DEFAULT_BASE_OPTIONS = {
    "num_frames": 2,
    "lora_steps": 1,
    "num_inference_steps": 2,
    "use_reschedule": False,
}


def write_corpus(directory: str | Path, base_options: dict | None = None) -> list[Path]:
    """One folder per case: each field as a file named after it, plus expect.json."""
    root = Path(directory)
    folders = []
    for case in build_corpus(DEFAULT_BASE_OPTIONS if base_options is None else base_options):
        folder = root / case.name
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in case.fields.items():
            (folder / key).write_bytes(value)
        expect = {
            "expect": case.expect,
            "message": case.message,
            "transports": list(case.transports),
            "token": case.token,
            "note": case.note,
            "fields": sorted(case.fields),
        }
        (folder / "expect.json").write_text(json.dumps(expect, indent=2, ensure_ascii=False) + "\n")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="directory to write one folder per case into")
    parser.add_argument(
        "--options",
        default=json.dumps(DEFAULT_BASE_OPTIONS),
        help="JSON object: the small morph options every ok case uses",
    )
    args = parser.parse_args(argv)
    folders = write_corpus(args.out, json.loads(args.options))
    print(f"wrote {len(folders)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
