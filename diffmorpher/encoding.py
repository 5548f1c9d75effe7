"""Encoding finished frames into the delivery formats (GIF, MP4, WebP, ZIP of PNGs, PNG per frame).

Servers send encoded bytes, never arrays of pixels: a 16-frame 512 px morph is ~12 MB as raw
RGB but a few MB as GIF and far less as MP4, which keeps responses under the server's
`max_response_size`. Kept free of any serving framework so every front end can share it.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from morph_protocol.formats import FRAMES_ZIP, GIF, MIME_TYPES, MP4, PNG, WEBP

from .config import ConfigError, OutputOptions

MIME_GIF = MIME_TYPES[GIF]
MIME_MP4 = MIME_TYPES[MP4]
MIME_ZIP = MIME_TYPES[FRAMES_ZIP]
MIME_PNG = MIME_TYPES[PNG]
MIME_WEBP = MIME_TYPES[WEBP]


@dataclass(frozen=True)
class EncodedPart:
    """One named blob of an encoded result (e.g. `morph.gif`, or `frame_003.png`)."""

    name: str
    mime: str
    data: bytes


def encode_png(frame: Image.Image) -> bytes:
    """One frame as PNG: lossless, and what streamed frames are sent as."""
    buffer = io.BytesIO()
    frame.convert("RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def frame_name(index: int, count: int) -> str:
    """`frame_007.png`: zero-padded so the names sort in frame order."""
    width = max(3, len(str(max(count - 1, 0))))
    return f"frame_{index:0{width}d}.png"


def _animation(frames: Sequence[Image.Image], options: OutputOptions, **format_args: object) -> bytes:
    """The frames as one animated image file: RGB, every frame after the first appended, each
    shown `frame_duration_ms`; `format_args` are Pillow's writer's own (format, loop, ...)."""
    rgb = [frame.convert("RGB") for frame in frames]
    buffer = io.BytesIO()
    rgb[0].save(buffer, save_all=True, append_images=rgb[1:], duration=options.frame_duration_ms, **format_args)
    return buffer.getvalue()


def encode_gif(frames: Sequence[Image.Image], options: OutputOptions) -> bytes:
    """An animated GIF. Pillow merges a frame identical to its predecessor into it (durations
    add up), so a GIF can hold fewer frames than the morph when two neighbours are identical;
    playback is the same."""
    # loop 0 = repeat forever; without the key the GIF plays once
    looping = {"loop": 0} if options.loop else {}
    return _animation(frames, options, format="GIF", disposal=1, optimize=False, **looping)


def encode_webp(frames: Sequence[Image.Image], options: OutputOptions) -> bytes:
    """An animated WebP: lossy at `webp_quality` (full colour, unlike GIF's 256, and a few times
    smaller), or lossless (`webp_lossless`: every pixel as the morph made it). libwebp, like
    Pillow's GIF writer, merges a frame identical to its predecessor into it (durations add
    up); playback is the same."""
    quality = {} if options.webp_lossless else {"quality": options.webp_quality}
    return _animation(
        frames, options, format="WEBP",
        loop=0 if options.loop else 1,  # WebP counts plays: 0 = forever, 1 = once
        lossless=options.webp_lossless,
        method=4,  # libwebp's default effort; 6 (its most) took 45x longer for 1.4 % less (demo, lossless)
        **quality,
    )


def encode_mp4(frames: Sequence[Image.Image], options: OutputOptions) -> bytes:
    """H.264 MP4 (yuv420p, playable everywhere). yuv420p needs even dimensions, so odd sizes
    are padded up by one pixel (edge colour) instead of being rescaled. ffmpeg writes to a file
    because MP4's index is written after the frames."""
    import imageio_ffmpeg  # imported here: only MP4 requests need ffmpeg

    first = frames[0].convert("RGB")
    width, height = first.size
    even_w, even_h = width + width % 2, height + height % 2
    fps = 1000.0 / options.frame_duration_ms
    with tempfile.TemporaryDirectory(prefix="diffmorpher-mp4-") as tmp:
        path = os.path.join(tmp, "morph.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (even_w, even_h),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,  # no rescaling: we pad to even sizes ourselves
            quality=8,
            output_params=["-movflags", "+faststart"],
        )
        writer.send(None)  # start the generator (spawns ffmpeg)
        try:
            for frame in frames:
                rgb = _pad_to(frame.convert("RGB"), even_w, even_h)
                writer.send(rgb.tobytes())
        finally:
            writer.close()
        with open(path, "rb") as handle:
            return handle.read()


def _pad_to(frame: Image.Image, width: int, height: int) -> Image.Image:
    if frame.size == (width, height):
        return frame
    canvas = Image.new("RGB", (width, height))
    canvas.paste(frame, (0, 0))
    # Repeat the last row/column rather than leaving black lines.
    if width > frame.width:
        canvas.paste(frame.crop((frame.width - 1, 0, frame.width, frame.height)), (frame.width, 0))
    if height > frame.height:
        canvas.paste(canvas.crop((0, frame.height - 1, width, frame.height)), (0, frame.height))
    return canvas


def encode_frames_zip(frames: Sequence[Image.Image]) -> bytes:
    """A ZIP of `frame_000.png`, ... stored without recompression (PNG is compressed already)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, frame in enumerate(frames):
            archive.writestr(frame_name(index, len(frames)), encode_png(frame))
    return buffer.getvalue()


def encode_parts(frames: Sequence[Image.Image], options: OutputOptions) -> list[EncodedPart]:
    """The result as named parts: one part for gif / mp4 / webp / frames-zip, one PNG per frame for
    `png` (the envelope carries several parts, so no container is needed)."""
    if not frames:
        raise ConfigError("there are no frames to encode")
    if len({frame.size for frame in frames}) != 1:
        raise ConfigError("all frames must have the same size to be encoded together")
    if options.format == GIF:
        return [EncodedPart("morph.gif", MIME_GIF, encode_gif(frames, options))]
    if options.format == MP4:
        return [EncodedPart("morph.mp4", MIME_MP4, encode_mp4(frames, options))]
    if options.format == WEBP:
        return [EncodedPart("morph.webp", MIME_WEBP, encode_webp(frames, options))]
    if options.format == FRAMES_ZIP:
        return [EncodedPart("frames.zip", MIME_ZIP, encode_frames_zip(frames))]
    if options.format == PNG:
        return [
            EncodedPart(frame_name(i, len(frames)), MIME_PNG, encode_png(frame))
            for i, frame in enumerate(frames)
        ]
    raise ConfigError(f"format must be one of {list(OutputOptions.FORMATS)}, got {options.format!r}")


def encode_frames(frames: Sequence[Image.Image], options: OutputOptions) -> tuple[bytes, str]:
    """The result as one blob and its MIME type. For `png` (one file per frame) the single blob
    is the ZIP of PNGs; servers that can carry several parts use `encode_parts` instead."""
    if options.format == PNG:
        return encode_frames_zip(frames), MIME_ZIP
    (part,) = encode_parts(frames, options)
    return part.data, part.mime
