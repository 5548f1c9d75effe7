"""Open Inference Protocol (KServe v2) ModelInfer requests, as native morph requests (no framework import).

TorchServe 0.12's ModelInfer (served with `ts_open_inference_protocol=true`) hands the handler
one field, `body`: a JSON object with the request's `id`, `model_name` and `inputs` (each with
`name`, `datatype`, `shape` and `data`; BYTES elements in base64). The guard's gateway adds the
request's parameters, the requested outputs, the deadline and the call id as one more input
tensor (guard.oip.GATEWAY_INPUT), since TorchServe drops them. This module only translates:

- `images` (BYTES [K]) -> `image_<i>` (or `image_ref_<i>` for an element b"ref:<image_key>"),
  `prompts` (BYTES [K]) -> `prompt_<i>`, the parameters -> `options` (each parameter one
  option; a string parameter `options` may hold a JSON object for what parameters cannot
  carry, e.g. a list of formats), `deadline` and `call_id` -> the fields of the same name;

then morph_request.parse_request checks the result like any native request, and `oip_message`
names the tensor in its errors (from the error's `field`, not its text). The answer (`response_body`) is the JSON that
TorchServe turns into a ModelInferResponse: output `frames` (the native result's parts, in
order) and `metadata` (the native result's header as JSON), both BYTES. ModelInfer is unary: no
`stream` field is ever produced, so the handler never sends intermediate responses for it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Mapping

from morph_protocol import limits, wire
from diffmorpher.config import ConfigError, FieldNamed, name_list, show
from morph_protocol.oip import (
    BYTES,
    GATEWAY_INPUT,
    IMAGE_REF_PREFIX,
    INPUT_IMAGES,
    INPUT_PROMPTS,
    KEY_OUTPUTS,
    KEY_PARAMETERS,
    OUTPUT_FRAMES,
    OUTPUT_METADATA,
    PARAM_CALL_ID,
    PARAM_DEADLINE,
)
from handler.morph_request import parse_options

BODY = "body"  # the one field TorchServe's ModelInfer (and REST /v2/models/<m>/infer) sends
CONTENT_TYPE = "application/json"
OUTPUTS = (OUTPUT_FRAMES, OUTPUT_METADATA)
PARAM_OPTIONS = "options"
PARAM_STREAM = "stream"


@dataclass(frozen=True)
class InferRequest:
    """A ModelInfer request: what the response echoes, and the native input map."""

    id: str
    model_name: str
    model_version: str
    fields: dict[str, bytes]  # image_<i>/image_ref_<i>, prompt_<i>, options, deadline, call_id
    outputs: tuple[str, ...]  # the requested outputs, in the order asked for (empty: all)


def parse_infer_request(data: Any) -> InferRequest | None:
    """The request as native fields, or None when `data` is not a ModelInfer body (a native
    request, or a REST body that is no OIP JSON, which the native parser then refuses)."""
    body = _body(data)
    if body is None:
        return None
    inputs = body["inputs"]
    if not isinstance(inputs, list):
        raise ConfigError(f"'inputs' must be a list of tensors, got {type(inputs).__name__}")
    tensors: dict[str, Mapping[str, Any]] = {}
    for tensor in inputs:
        name = tensor.get("name") if isinstance(tensor, Mapping) else None
        if not isinstance(name, str):
            raise ConfigError("every input tensor needs a name")
        if name in tensors:
            raise ConfigError(f"input tensor {show(name)} is sent twice")
        tensors[name] = tensor
    unknown = sorted(set(tensors) - {INPUT_IMAGES, INPUT_PROMPTS, GATEWAY_INPUT})
    if unknown:
        raise ConfigError(
            f"unknown input tensor(s) {name_list(unknown)}; expected {INPUT_IMAGES!r} and {INPUT_PROMPTS!r} "
            f"(BYTES, shape [K], one element per image); send options as request parameters"
        )
    if GATEWAY_INPUT not in tensors:
        raise ConfigError(
            "this ModelInfer call did not come through the gateway: TorchServe 0.12 drops a request's "
            "parameters and raw contents, so call the gateway's inference.GRPCInferenceService (port 7070)"
        )
    parameters, outputs = _gateway_contract(tensors[GATEWAY_INPUT])
    images = _bytes_elements(tensors, INPUT_IMAGES)
    prompts = _bytes_elements(tensors, INPUT_PROMPTS)
    # One image and K >= 2 prompts: the server makes the other endpoints (the native parser checks K).
    one_image = len(images) == 1 and len(prompts) >= limits.MIN_ONE_IMAGE_PROMPTS
    if not one_image and not limits.MIN_IMAGES <= len(images) <= limits.MAX_IMAGES:
        raise ConfigError(
            f"input tensor {INPUT_IMAGES!r} has {len(images)} element(s); a morph needs "
            f"{limits.MIN_IMAGES} to {limits.MAX_IMAGES} images"
        )
    if not one_image and len(prompts) != len(images):
        raise ConfigError(
            f"input tensor {INPUT_PROMPTS!r} has {len(prompts)} element(s) for {len(images)} images: "
            f"send one prompt per image"
        )
    fields: dict[str, bytes] = {}
    for index, image in enumerate(images):
        if image.startswith(IMAGE_REF_PREFIX):
            fields[wire.image_ref_key(index)] = image[len(IMAGE_REF_PREFIX):]
        else:
            fields[wire.image_key(index)] = image
    for index, prompt in enumerate(prompts):
        fields[wire.prompt_key(index)] = prompt
    for key in (PARAM_DEADLINE, PARAM_CALL_ID):  # checked by request_stop.parse_call_control
        if key in parameters:
            fields[key] = _text(parameters.pop(key))
    if PARAM_STREAM in parameters:
        raise ConfigError(
            "parameter 'stream': ModelInfer is unary and answers with the result only; for progress "
            "and frames as they are made, call the native StreamPredictions"
        )
    fields[wire.INPUT_OPTIONS] = json.dumps(_options(parameters)).encode("utf-8")
    return InferRequest(
        id=_string(body.get("id")), model_name=_string(body.get("model_name")),
        model_version=_string(body.get("model_version")), fields=fields, outputs=outputs,
    )


def field_label(field: str) -> str:
    """How a ModelInfer request calls a native field: image_1 -> input tensor 'images' element 1
    (image_ref_1 the same, holding ref:<image_key>), prompt_0 -> input tensor 'prompts' element
    0, options -> the request parameters; other fields by their native name."""
    for prefix, tensor, note in ((wire.image_ref_key(0)[:-1], INPUT_IMAGES, f" ({IMAGE_REF_PREFIX.decode()}<image_key>)"),
                                 (wire.image_key(0)[:-1], INPUT_IMAGES, ""),
                                 (wire.prompt_key(0)[:-1], INPUT_PROMPTS, "")):
        index = field.removeprefix(prefix)
        if index != field and index.isdigit():
            return f"input tensor {tensor!r} element {index}{note}"
    if field == wire.INPUT_OPTIONS:
        return "the request parameters (options)"
    return f"field {field!r}"


def oip_message(error: FieldNamed) -> str:
    """A native parser's error message in OIP terms: the field it is about named as ModelInfer
    calls it (field_label); a message naming no field as it is."""
    return error.naming(field_label(error.field)) if error.field is not None else str(error)


def response_body(request: InferRequest, model_name: str, model_version: str,
                  metadata: Mapping[str, Any], parts: list[wire.Part]) -> bytes:
    """The JSON that TorchServe turns into the ModelInferResponse (id, model name and version
    are required by it). `metadata` holds the native result's header, parts described as in
    the native message, so a client reads it exactly as wire.decode_message's header."""
    header = {
        **metadata,
        "type": wire.TYPE_RESULT,
        "parts": [{"name": p.name, "mime": p.mime, "size": len(p.data)} for p in parts],
    }
    elements = {
        OUTPUT_FRAMES: [part.data for part in parts],
        OUTPUT_METADATA: [json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")],
    }
    outputs = [
        {
            "name": name,
            "datatype": BYTES,
            "shape": [len(elements[name])],
            "data": [base64.b64encode(element).decode("ascii") for element in elements[name]],
        }
        for name in (request.outputs or OUTPUTS)
    ]
    body = {
        "id": request.id,
        "model_name": request.model_name or model_name,
        "model_version": request.model_version or model_version,
        "outputs": outputs,
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------- helpers
def _body(data: Any) -> Mapping[str, Any] | None:
    """The ModelInfer JSON body, if `data` is one: a single field `body` holding a JSON object
    with `inputs` (bytes as TorchServe passes it here, or already decoded)."""
    if not isinstance(data, Mapping) or set(data) != {BODY}:
        return None
    value = data[BODY]
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if raw[:256].lstrip()[:1] != b"{":
            return None
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None  # not JSON: the native parser says what a request must be
    return value if isinstance(value, Mapping) and "inputs" in value else None


def _bytes_elements(tensors: Mapping[str, Mapping[str, Any]], name: str) -> list[bytes]:
    """The elements of BYTES tensor `name`, shape [K], decoded from base64."""
    tensor = tensors.get(name)
    if tensor is None:
        raise ConfigError(f"missing input tensor {name!r} (BYTES, shape [K], one element per image)")
    datatype = tensor.get("datatype")
    if datatype != BYTES:
        raise ConfigError(f"input tensor {name!r} must be BYTES, got {show(datatype)}")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ConfigError(f"input tensor {name!r} has no elements")
    shape = tensor.get("shape")
    if shape != [len(data)]:
        raise ConfigError(
            f"input tensor {name!r} has shape {show(shape)} and {len(data)} element(s); send shape [{len(data)}]"
        )
    elements = []
    for index, element in enumerate(data):
        try:
            if not isinstance(element, str):
                raise ValueError(type(element).__name__)
            elements.append(base64.b64decode(element, validate=True))
        except (ValueError, binascii.Error) as error:
            raise ConfigError(
                f"input tensor {name!r} element {index} is not base64 text ({error}): TorchServe's "
                f"ModelInfer passes BYTES elements to the handler in base64"
            ) from error
    return elements


def _gateway_contract(tensor: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The parameters and requested outputs the gateway forwarded (guard.oip.upstream_request)."""
    try:
        [element] = _bytes_elements({GATEWAY_INPUT: tensor}, GATEWAY_INPUT)
        contract = json.loads(element)
        parameters, outputs = contract[KEY_PARAMETERS], contract[KEY_OUTPUTS]
        if not isinstance(parameters, dict) or not isinstance(outputs, list):
            raise ValueError("parameters must be an object, outputs a list")
    except (ConfigError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"input tensor {GATEWAY_INPUT!r} is the gateway's own and is malformed: {error}") from error
    if not all(isinstance(output, str) for output in outputs):
        raise ConfigError(f"requested outputs must be names, got {show(outputs)}")
    unknown = [output for output in outputs if output not in OUTPUTS]
    if unknown or len(set(outputs)) != len(outputs):
        raise ConfigError(
            f"requested outputs {name_list(outputs)}: this model's outputs are {OUTPUTS[0]!r} and "
            f"{OUTPUTS[1]!r}, each at most once"
        )
    return parameters, tuple(outputs)


def _options(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Morph options from the request parameters: each parameter is an option, and the string
    parameter `options` may hold a JSON object of more (checked by the native options parser)."""
    parameters = dict(parameters)
    options: dict[str, Any] = {}
    if PARAM_OPTIONS in parameters:
        value = parameters.pop(PARAM_OPTIONS)
        if not isinstance(value, str):
            raise ConfigError(
                f"parameter 'options' must be a string holding a JSON object (for values parameters "
                f"cannot carry, e.g. {{\"format\": [\"gif\", \"png\"]}}), got {show(value)}"
            )
        options = parse_options(value.encode("utf-8"))
    for key, value in parameters.items():
        if key in options:
            raise ConfigError(f"option {key!r} is sent twice: as a parameter and inside parameter 'options'")
        options[key] = value
    return options


def _text(value: Any) -> bytes:
    """A deadline or call id as the native field's text (a non-number is refused there)."""
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""
