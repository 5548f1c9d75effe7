"""TorchServe's config.properties as every process of the service reads it (standard library only).

TorchServe, the guard, the web page, the archive export and the test launchers all start from
the same file; its `max_request_size` / `max_response_size` are the service's size limits, whose
defaults (where the file sets none) are `morph_protocol.limits`' (tests/test_limits.py checks
that the shipped files agree with them).
"""

from __future__ import annotations

from pathlib import Path

from . import limits

MAX_REQUEST_SIZE = "max_request_size"
MAX_RESPONSE_SIZE = "max_response_size"


def parse_properties(text: str) -> dict[str, str]:
    """A config.properties text as a dict (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def read_properties(path: Path) -> dict[str, str]:
    """A TorchServe config.properties file as a dict (a missing file is an error: a process
    started with the wrong path must not run on defaults unnoticed)."""
    return parse_properties(Path(path).read_text())


def replace_properties(text: str, overrides: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A config.properties text with the given keys' values replaced in place, and the
    overrides it has no line for."""
    missing = dict(overrides)
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in missing:
            line = f"{key}={missing.pop(key)}"
        lines.append(line)
    return "\n".join(lines) + "\n", missing


def max_request_bytes(props: dict[str, str]) -> int:
    """The largest request the service takes: `max_request_size`, else limits.MAX_REQUEST_BYTES."""
    return _size(props, MAX_REQUEST_SIZE, limits.MAX_REQUEST_BYTES)


def max_response_bytes(props: dict[str, str]) -> int:
    """The largest response payload: `max_response_size`, else limits.MAX_RESPONSE_BYTES."""
    return _size(props, MAX_RESPONSE_SIZE, limits.MAX_RESPONSE_BYTES)


def _size(props: dict[str, str], key: str, default: int) -> int:
    value = props.get(key, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{key}={value!r} in config.properties is not a byte count")
    return int(value)
