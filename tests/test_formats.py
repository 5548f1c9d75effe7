"""Output formats are defined once (morph_protocol.formats), with one suffix rule for both CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from morph_protocol import formats
from morph_protocol.formats import FORMATS, MIME_TYPES, format_for_path
from tests.conftest import REPO_ROOT


def test_every_format_has_one_mime_type_and_one_suffix() -> None:
    assert FORMATS == ("gif", "mp4", "frames-zip", "png", "webp")
    assert formats.DEFAULT_FORMAT == FORMATS[0] == "gif"
    assert MIME_TYPES == {"gif": "image/gif", "mp4": "video/mp4", "frames-zip": "application/zip", "png": "image/png",
                          "webp": "image/webp"}
    assert formats.SUFFIX_FORMATS == {".gif": "gif", ".mp4": "mp4", ".zip": "frames-zip", "": "png", ".webp": "webp"}


@pytest.mark.parametrize("path, expected", [
    ("morph.gif", "gif"), ("out/MORPH.GIF", "gif"), (Path("a/b.mp4"), "mp4"), ("frames.zip", "frames-zip"),
    ("out/frames", "png"), (Path("frames"), "png"), (PurePosixPath("x/y.tar.zip"), "frames-zip"),
    ("x.webp", "webp"), ("out/X.WEBP", "webp"),
])  # fmt: skip
def test_a_known_suffix_maps_to_its_format_and_no_suffix_is_a_png_directory(path, expected) -> None:
    assert format_for_path(path) == expected


@pytest.mark.parametrize("path", ["morph.png", "morph.webm", "a.GIFF", "notes.txt"])
def test_an_unknown_suffix_is_an_error_naming_the_known_ones(path) -> None:
    with pytest.raises(ValueError) as caught:
        format_for_path(path)
    message = str(caught.value)
    assert path in message
    assert all(suffix in message for suffix in (".gif", ".mp4", ".webp", ".zip", "no suffix"))


def test_the_core_client_and_page_use_the_one_definition() -> None:
    from client.__main__ import build_parser
    from diffmorpher.config import OutputOptions
    from diffmorpher.encoding import MIME_GIF, MIME_MP4, MIME_PNG, MIME_WEBP, MIME_ZIP
    from web.events import MEDIA_KEYS
    from web.limits import CHOSEN_FORMATS, FORMATS as PAGE_FORMATS

    assert OutputOptions.FORMATS is FORMATS
    assert (MIME_GIF, MIME_MP4, MIME_ZIP, MIME_PNG, MIME_WEBP) == tuple(MIME_TYPES[f] for f in FORMATS)
    assert set(PAGE_FORMATS) < set(FORMATS) and set(CHOSEN_FORMATS) < set(FORMATS) - set(PAGE_FORMATS)
    assert set(MEDIA_KEYS) == {MIME_TYPES[f] for f in PAGE_FORMATS + CHOSEN_FORMATS}
    morph = build_parser()._subparsers._group_actions[0].choices["morph"]  # type: ignore[union-attr]
    (fmt,) = [action for action in morph._actions if action.dest == "format"]
    assert tuple(fmt.choices) == FORMATS


def test_both_command_lines_refuse_an_unknown_suffix_before_any_work(tmp_path: Path) -> None:
    """`python -m diffmorpher` (core) and `python -m client`: the same rule, the same message,
    before a model is loaded or a server is called."""
    morph = ["morph", "a.png", "b.png", "--prompt-a", "a", "--prompt-b", "b", "--out", "m.webm"]
    commands = {
        "diffmorpher": [*morph, "--model", str(tmp_path / "no-model")],
        "client": ["--target", "127.0.0.1:1", "--no-auth", *morph],
    }
    env = dict(os.environ)
    for module, argv in commands.items():
        process = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert process.returncode != 0, (module, process.stdout, process.stderr[-2000:])
        assert "'m.webm'" in process.stderr and ".gif (gif)" in process.stderr, (module, process.stderr[-2000:])
