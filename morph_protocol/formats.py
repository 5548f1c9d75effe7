"""The morph's output formats, defined once: name, MIME type, file suffix.

A request's `options.format` names one or more of them; the core encodes into them, the result's
parts carry their MIME types, and both command lines (`python -m diffmorpher`, `python -m
client`) pick a format from an output path with one rule (`format_for_path`): a known suffix maps
to its format, a path without a suffix is a directory of PNG frames, any other suffix is an
error. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

GIF = "gif"
MP4 = "mp4"
FRAMES_ZIP = "frames-zip"
PNG = "png"
WEBP = "webp"


@dataclass(frozen=True)
class OutputFormat:
    name: str  # what `options.format` says
    mime: str  # the MIME type of the result's part(s)
    suffix: str  # the output path's suffix; "" = a directory holding one PNG per frame
    description: str


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    fmt.name: fmt
    for fmt in (
        OutputFormat(GIF, "image/gif", ".gif", "animated GIF"),
        OutputFormat(MP4, "video/mp4", ".mp4", "H.264 MP4 video"),
        OutputFormat(FRAMES_ZIP, "application/zip", ".zip", "ZIP of one PNG per frame"),
        OutputFormat(PNG, "image/png", "", "one PNG per frame (a directory)"),
        OutputFormat(WEBP, "image/webp", ".webp", "animated WebP (lossy, or lossless with webp_lossless)"),
    )
}
FORMATS: tuple[str, ...] = tuple(OUTPUT_FORMATS)  # every format name, default (gif) first
DEFAULT_FORMAT = GIF
MIME_TYPES: dict[str, str] = {name: fmt.mime for name, fmt in OUTPUT_FORMATS.items()}
SUFFIX_FORMATS: dict[str, str] = {fmt.suffix: name for name, fmt in OUTPUT_FORMATS.items()}


def known_suffixes() -> str:
    """The suffixes `format_for_path` knows, for messages: ".gif (gif), ..., no suffix (png)"."""
    return ", ".join(f"{suffix or 'no suffix'} ({name})" for suffix, name in SUFFIX_FORMATS.items())


def format_for_path(path: str | PurePath) -> str:
    """The format an output path asks for: its suffix's format (case-insensitive), `png` (a
    directory of frames) for a path without a suffix; ValueError for any other suffix."""
    suffix = PurePath(path).suffix.lower()
    try:
        return SUFFIX_FORMATS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the output format of {str(path)!r} from its suffix {suffix!r}: "
            f"known are {known_suffixes()}; or name the format"
        ) from None
