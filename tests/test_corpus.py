"""The hostile-request corpus (reliability/corpus.py) against the handler's request parsing: every
case the handler itself must catch gets its expected outcome and message. No server, no model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from morph_protocol import limits, wire
from diffmorpher.config import ConfigError, MorphConfig
from handler.morph_request import MorphRequest, parse_request
from reliability import corpus

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}
CASES = corpus.build_corpus(BASE)
# The handler cannot see which RPC carried a request: the gateway refuses stream=true on unary.
GATEWAY_ONLY = {"stream_true_on_unary"}
HANDLER_CASES = [c for c in CASES if c.token == "valid" and c.name not in GATEWAY_ONLY]


def test_corpus_is_large_and_well_named() -> None:
    names = [case.name for case in CASES]
    assert len(CASES) >= 45
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name) for name in names), names
    assert {case.expect for case in CASES} >= {"ok", "invalid", "unauthenticated"}
    assert all(case.note for case in CASES)


def test_ok_cases_use_the_small_base_options() -> None:
    for case in CASES:
        if case.expect == "ok":
            options = json.loads(case.fields[wire.INPUT_OPTIONS])
            assert {k: options[k] for k in BASE} == BASE, case.name


def test_corpus_needs_no_torch_and_no_handler() -> None:
    """Load tests and clients import it: standard library, Pillow, numpy and morph_protocol.wire only."""
    code = (
        "import sys, reliability.corpus as c; c.build_corpus({'num_frames': 2}); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffmorpher', 'morph_request', 'torchserve_handler', 'ts', 'grpc')); "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env={}
    )


@pytest.mark.parametrize("case", HANDLER_CASES, ids=[c.name for c in HANDLER_CASES])
def test_handler_gives_each_case_its_outcome(case: corpus.Case) -> None:
    if case.expect == "ok":
        request = parse_request(case.fields, MorphConfig())
        assert isinstance(request, MorphRequest)
        assert all(image.mode == "RGB" and not image.info for image in request.images)
        assert request.config.num_frames == BASE["num_frames"]
        return
    assert case.expect == "invalid", f"{case.name}: the handler only sees ok and invalid requests"
    with pytest.raises(ConfigError) as raised:
        parse_request(case.fields, MorphConfig())
    message = str(raised.value)
    assert case.message in message
    assert len(message) < 1000, "error messages stay short whatever the request holds"


def test_unauthenticated_cases_are_otherwise_valid() -> None:
    """So that only the token can explain a refusal."""
    for case in CASES:
        if case.token != "valid":
            assert case.expect == "unauthenticated"
            parse_request(case.fields, MorphConfig())


def test_stream_on_unary_is_left_to_the_gateway() -> None:
    (case,) = [c for c in CASES if c.name in GATEWAY_ONLY]
    assert (
        case.transports == ("unary",)
        and case.expect == "invalid"
        and "StreamPredictions" in case.message
    )
    assert parse_request(case.fields, MorphConfig()).stream  # the handler alone would stream it


def test_exif_rotated_photo_is_decoded_upright() -> None:
    case = next(c for c in CASES if c.name == corpus.EXIF_CASE)
    image = parse_request(case.fields, MorphConfig()).images[0]
    assert image.size == corpus.EXIF_UPRIGHT_SIZE
    pixels = np.asarray(image).astype(int)
    corner, width, height = corpus.EXIF_CORNER, *corpus.EXIF_UPRIGHT_SIZE
    red = np.array(corpus.RED)
    assert np.abs(pixels[corner // 2, corner // 2] - red).max() < 40  # top-left: the red block
    for y, x in [(height - 4, 4), (4, width - 4), (height - 4, width - 4)]:
        assert pixels[y, x].min() > 215, (y, x)  # every other corner: white


def test_transparency_and_16_bit_images_keep_their_picture() -> None:
    by_name = {c.name: c for c in CASES}
    rgba = np.asarray(
        parse_request(by_name["rgba_png_transparent"].fields, MorphConfig()).images[0]
    )
    assert rgba[1, 1].tolist() == [255, 255, 255]  # transparent background on white, not black
    assert rgba[32, 32].tolist() == list(corpus.RED)
    deep = np.asarray(
        parse_request(by_name["png_16bit_grayscale"].fields, MorphConfig()).images[0]
    ).astype(int)
    assert (
        deep[32, 32, 0] < 40 and 60 < deep[1, 1, 0] < 120 and deep[1, -2, 0] > 240
    )  # disc on a ramp


@pytest.mark.parametrize(
    "name", [c.name for c in CASES if "bomb" in c.name or c.name.startswith("png_header")]
)
def test_oversized_images_are_refused_from_their_header(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    assert sum(len(v) for k, v in case.fields.items() if k.startswith("image_")) < 20_000
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="exceeds the image size limit"):
        parse_request(case.fields, MorphConfig())
    assert time.perf_counter() - started < 1.0


def test_huge_request_case_is_over_the_frontend_limit() -> None:
    (case,) = [c for c in corpus.build_corpus(BASE, include_huge=True) if c.expect == "too_large"]
    assert sum(len(v) for v in case.fields.values()) > limits.MAX_REQUEST_BYTES


def test_cli_writes_one_folder_per_case(tmp_path: Path) -> None:
    assert corpus.main(["--out", str(tmp_path), "--options", json.dumps(BASE)]) == 0
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == sorted(c.name for c in CASES)
    expect = json.loads((tmp_path / "image_index_gap" / "expect.json").read_text())
    assert expect["expect"] == "invalid" and "image_2" in expect["fields"]
    assert (tmp_path / "baseline" / "image_0").read_bytes().startswith(b"\x89PNG")
