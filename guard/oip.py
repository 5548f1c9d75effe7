"""Open Inference Protocol (KServe v2) calls through the gateway: what it changes on the way.

KServe v2 clients (tritonclient, kserve) call `inference.GRPCInferenceService`. TorchServe 0.12
(with `ts_open_inference_protocol=true`) serves the same messages on its internal gRPC port as
`org.pytorch.serve.grpc.openinference.GRPCInferenceService`, and its ModelInfer hands the worker
a JSON body of the input tensors (BYTES elements in base64); but on the way it drops what a
client needs, so the gateway, per ModelInfer call:

- moves `raw_input_contents` (how tritonclient sends every tensor, and TorchServe ignores) into
  each BYTES tensor's `contents.bytes_contents`;
- puts the request `parameters` (the morph's options; TorchServe drops them), the requested
  `outputs` (dropped too), the call's `deadline` and its `call_id` into one extra BYTES input
  tensor, GATEWAY_INPUT (one element: a JSON object), which the handler (handler/oip.py) reads;
- decodes the BYTES outputs, which TorchServe returns as the JSON text of what the handler wrote
  (a quoted base64 string per element), and answers with `raw_output_contents`, as Triton does
  (tritonclient reads typed `bytes_contents` through a numpy no-copy view that numpy 2 refuses).

The tensor and parameter names are the contract between gateway and handler; they live in
morph_protocol.oip, which both import.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from morph_protocol.oip import (
    BYTES,
    GATEWAY_INPUT,
    KEY_PARAMETERS,
    KEY_OUTPUTS,
    PARAM_DEADLINE,
    PARAM_CALL_ID,
)

_LENGTH = struct.Struct("<I")


class OipError(ValueError):
    """A client's ModelInfer request the gateway cannot forward (INVALID_ARGUMENT)."""


class UpstreamFormatError(RuntimeError):
    """TorchServe's answer is not what the handler writes (INTERNAL)."""


def parameter_value(parameter: Any) -> Any:
    """An InferParameter as a JSON value (bool, int, str or float); None when unset."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element as a 4-byte little-endian length + its bytes."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise OipError(f"raw contents of input tensor {name!r} end inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise OipError(
                f"raw contents of input tensor {name!r}: element {len(elements)} claims {length} bytes, "
                f"{len(raw) - offset} are left (BYTES elements are a 4-byte little-endian length, then the bytes)"
            )
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def upstream_request(request: Any, *, deadline: float | None, call_id: str) -> None:
    """Turn a client's ModelInferRequest, in place, into what TorchServe's ModelInfer passes on."""
    if any(tensor.name == GATEWAY_INPUT for tensor in request.inputs):
        raise OipError(f"input tensor name {GATEWAY_INPUT!r} is reserved for the gateway")
    raw_contents = list(request.raw_input_contents)
    if raw_contents:
        if len(raw_contents) != len(request.inputs):
            raise OipError(
                f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} input tensors; "
                f"send one per input, in order"
            )
        for tensor, raw in zip(request.inputs, raw_contents):
            if tensor.contents.ByteSize():
                raise OipError(f"input tensor {tensor.name!r} has both contents and raw_input_contents; send one")
            if tensor.datatype == BYTES:
                tensor.contents.bytes_contents.extend(deserialize_bytes(raw, tensor.name))
            # Other datatypes: this model takes BYTES only, and the handler refuses them by name.
        del request.raw_input_contents[:]
    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    if deadline is not None:
        parameters[PARAM_DEADLINE] = round(deadline, 3)
    parameters[PARAM_CALL_ID] = call_id
    contract = {KEY_PARAMETERS: parameters, KEY_OUTPUTS: [output.name for output in request.outputs]}
    request.parameters.clear()
    del request.outputs[:]
    tensor = request.inputs.add(name=GATEWAY_INPUT, datatype=BYTES, shape=[1])
    # allow_nan: a NaN option reaches the handler's parser, which refuses it by name.
    tensor.contents.bytes_contents.append(json.dumps(contract, separators=(",", ":")).encode("utf-8"))


def client_response(response: Any) -> None:
    """Turn TorchServe's ModelInferResponse, in place, into a standard one (raw BYTES outputs)."""
    raw_contents = []
    for output in response.outputs:
        if output.datatype != BYTES:
            raise UpstreamFormatError(f"output {output.name!r} is {output.datatype}; the handler writes BYTES only")
        raw_contents.append(serialize_bytes([_decode_element(output.name, e) for e in output.contents.bytes_contents]))
        output.ClearField("contents")
    del response.raw_output_contents[:]
    response.raw_output_contents.extend(raw_contents)


def _decode_element(name: str, element: bytes) -> bytes:
    """TorchServe writes a BYTES output element as the JSON text of the handler's value: a
    quoted base64 string."""
    try:
        text = json.loads(element)
        if not isinstance(text, str):
            raise ValueError(f"a JSON {type(text).__name__}, not a string")
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as error:
        raise UpstreamFormatError(f"output {name!r} has an element that is not quoted base64: {error}") from error
