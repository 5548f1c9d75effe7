"""morph_protocol.errors: the typed code a failed call carries, through TorchServe's text."""

from __future__ import annotations

import grpc
import pytest

from morph_protocol.errors import ErrorCode, format_error, parse_error

JAVA = "\norg.pytorch.serve.http.InternalServerException"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_survives_torchserve_and_has_a_status(code: ErrorCode) -> None:
    message = "invalid request: field 'image_1' is not a readable image [brackets] stay"
    assert parse_error(format_error(code, message) + JAVA) == (code, message)
    assert 400 <= code.http_status <= 599
    assert isinstance(getattr(grpc.StatusCode, code.grpc_status), grpc.StatusCode)


def test_the_tag_is_stable_text() -> None:
    """Clients in other languages read it: the format is part of the protocol."""
    assert format_error(ErrorCode.OUT_OF_MEMORY, "out of memory: x") == "out of memory: x [diffmorpher:out_of_memory]"
    assert (ErrorCode.BUSY.http_status, ErrorCode.BUSY.grpc_status) == (503, "UNAVAILABLE")
    assert (ErrorCode.OUT_OF_MEMORY.http_status, ErrorCode.OUT_OF_MEMORY.grpc_status) == (507, "RESOURCE_EXHAUSTED")
    assert (ErrorCode.DEADLINE_EXCEEDED.http_status, ErrorCode.CANCELLED.http_status) == (504, 499)


def test_untagged_and_unknown_codes_give_no_code() -> None:
    assert parse_error("Worker died." + JAVA) == (None, "Worker died.")
    assert parse_error("a message [diffmorpher:from_the_future]") == (None, "a message")
    assert parse_error("[diffmorpher:busy] at the start is not a tag") == (None, "[diffmorpher:busy] at the start is not a tag")
    assert parse_error("") == (None, "")
