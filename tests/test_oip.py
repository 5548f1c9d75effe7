"""The Open Inference Protocol (KServe v2) beside the native API, tested with a real KServe v2
client (tritonclient.grpc) through the guard's gateway to a real TorchServe.

First the pieces that need no server: our proto against TorchServe's (inside model-server.jar)
and tritonclient's, the gateway's raw BYTES encoding against tritonclient's, and the handler's
translation of a ModelInfer body (as TorchServe's Java frontend builds it) into native fields.
Then one TorchServe + guard (config.properties as shipped: ts_open_inference_protocol=true):
the same morph through ModelInfer and through the native client gives byte-identical parts;
bad requests get INVALID_ARGUMENT / NOT_FOUND / PERMISSION_DENIED with clear messages and the
same worker serves the next request; a ModelInfer deadline stops the morph on the worker.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from PIL import Image
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from morph_protocol import wire
from morph_protocol.errors import ErrorCode, parse_error
from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient
from diffmorpher.cache import CacheMiss
from diffmorpher.config import ConfigError, MorphConfig
from guard import oip as gateway_oip
from grpc_api import oip_proto
from handler.morph_request import parse_request
from handler.oip import oip_message, parse_infer_request, response_body
from tests.test_e2e_torchserve import TINY, demo_inputs
from tests.test_client import descriptor_set
from tests.test_encoding import webp_frames
from launcher.torchserve import TorchServeProcess

MODEL = "diffmorpher"
JAR = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
    "site-packages" / "ts" / "frontend" / "model-server.jar"


# ---------------------------------------------------------------------------- protocol definitions
def fields_by_message(file: descriptor_pb2.FileDescriptorProto) -> dict[str, set[tuple]]:
    """Every message (nested ones as Outer.Inner) -> its (number, name, type, label) fields."""
    shapes: dict[str, set[tuple]] = {}
    pending = [("", message) for message in file.message_type]
    while pending:
        prefix, message = pending.pop()
        name = prefix + message.name
        shapes[name] = {(f.number, f.name, f.type, f.label) for f in message.field}
        pending += [(name + ".", nested) for nested in message.nested_type]
    return shapes


def test_our_proto_matches_tritonclients_and_torchserves(tmp_path: Path) -> None:
    ours = oip_proto.descriptor_set().file[0]
    assert ours.package == "inference" and ours.service[0].name == "GRPCInferenceService"
    theirs_triton = descriptor_pb2.FileDescriptorProto()
    triton_pb2.DESCRIPTOR.CopyToProto(theirs_triton)
    our_fields, triton_fields = fields_by_message(ours), fields_by_message(theirs_triton)
    assert {name: triton_fields[name] for name in our_fields} == our_fields
    triton_methods = {
        m.name: (m.input_type, m.output_type, m.server_streaming) for m in theirs_triton.service[0].method
    }
    assert {m.name: (m.input_type, m.output_type, m.server_streaming) for m in ours.service[0].method} == {
        name: triton_methods[name] for name, _, _ in oip_proto.METHODS
    }
    if not JAR.is_file():
        pytest.skip("torchserve is not installed here")
    jar_dir = tmp_path / "jar"
    jar_dir.mkdir()
    with zipfile.ZipFile(JAR) as archive:
        (jar_dir / "open_inference_grpc.proto").write_bytes(archive.read("proto/open_inference_grpc.proto"))
    torchserve = descriptor_set(jar_dir, "open_inference_grpc.proto", [], tmp_path / "ts.pb").file[-1]
    assert f"{torchserve.package}.{torchserve.service[0].name}" == oip_proto.TORCHSERVE_SERVICE
    ts_fields = fields_by_message(torchserve)
    assert set(ts_fields) == set(our_fields)
    for name, fields in our_fields.items():
        if name == "InferParameter":  # TorchServe's lacks double_param and uint64_param
            assert ts_fields[name] == {f for f in fields if f[0] <= 3}, ts_fields[name]
        else:
            assert ts_fields[name] == fields, name
    assert {m.name for m in torchserve.service[0].method} == {name for name, _, _ in oip_proto.METHODS}


def test_raw_bytes_tensors_read_as_tritonclient_writes_them() -> None:
    elements = [b"\x89PNG\r\n\x1a\n\x00\x00", b"", "a prompt, ünïcode".encode(), bytes(range(256)) * 3]
    raw = serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()
    assert gateway_oip.deserialize_bytes(raw, "images") == elements
    assert gateway_oip.serialize_bytes(elements) == raw
    with pytest.raises(gateway_oip.OipError, match=r"element 0 claims 10 bytes, 6 are left"):
        gateway_oip.deserialize_bytes(raw[:10], "images")


# ---------------------------------------------------------------------------- handler translation
def torchserve_body(images: list[bytes], prompts: list[bytes], parameters: dict, outputs: list[str] = ()) -> dict:
    """The worker's `data[i]` for a ModelInfer call through the gateway: the JSON body TorchServe's
    OpenInferenceProtocolImpl builds (BYTES in base64) of the request guard.oip forwards."""
    messages = oip_proto.load()
    request = messages["ModelInferRequest"](model_name=MODEL, id="req-1")
    for name, elements in (("images", images), ("prompts", prompts)):
        request.inputs.add(name=name, datatype="BYTES", shape=[len(elements)])
        request.raw_input_contents.append(gateway_oip.serialize_bytes(elements))
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    for name in outputs:
        request.outputs.add(name=name)
    gateway_oip.upstream_request(request, deadline=1796100000.25, call_id="ab" * 16)
    inputs = [
        {"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
         "data": [base64.b64encode(e).decode() for e in t.contents.bytes_contents]}
        for t in request.inputs
    ]
    return {"body": json.dumps({"id": request.id, "model_name": request.model_name, "inputs": inputs}).encode()}


def test_a_model_infer_body_becomes_the_native_fields() -> None:
    ref = "ref:" + "a1" * 32
    parameters = {"seed": 3, "attn_lambda": 0.75, "use_adain": False, "options": '{"format": ["gif", "png"]}'}
    data = torchserve_body([b"PNG-A", ref.encode(), b"PNG-C"], [b"a", b"b", b"c"], parameters, outputs=["frames"])
    request = parse_infer_request(data)
    assert request is not None and request.id == "req-1" and request.model_name == MODEL
    assert request.outputs == ("frames",)
    fields = request.fields
    assert fields["image_0"] == b"PNG-A" and fields["image_ref_1"] == b"a1" * 32 and fields["image_2"] == b"PNG-C"
    assert "image_1" not in fields and [fields[f"prompt_{i}"] for i in range(3)] == [b"a", b"b", b"c"]
    assert json.loads(fields["options"]) == {
        "format": ["gif", "png"], "seed": 3, "attn_lambda": 0.75, "use_adain": False,
    }
    assert fields["deadline"] == b"1796100000.25" and fields["call_id"] == b"ab" * 16
    assert "stream" not in fields  # ModelInfer is unary: the handler never streams into it
    assert parse_infer_request({"image_0": b"x", "prompt_0": b"y"}) is None  # native
    assert parse_infer_request({"body": b"not json"}) is None  # left for the native parser's message


@pytest.mark.parametrize(
    ("images", "prompts", "parameters", "message"),
    [
        ([b"a"], [b"p"], {}, "input tensor 'images' has 1 element(s); a morph needs 2 to 8 images"),
        ([b"a", b"b"], [b"p"], {}, "input tensor 'prompts' has 1 element(s) for 2 images: send one prompt per image"),
        ([b"a", b"b"], [b"p", b"q"], {"stream": True}, "parameter 'stream': ModelInfer is unary"),
        ([b"a", b"b"], [b"p", b"q"], {"seed": 1, "options": '{"seed": 2}'}, "option 'seed' is sent twice"),
        ([b"a", b"b"], [b"p", b"q"], {"options": "[1]"}, "must be a JSON object"),
    ],
)
def test_model_infer_mistakes_are_named_by_tensor_and_parameter(images, prompts, parameters, message) -> None:
    with pytest.raises(ConfigError) as error:
        parse_infer_request(torchserve_body(images, prompts, parameters))
    assert message in oip_message(error.value)


def test_one_image_and_two_prompts_become_the_native_one_image_fields() -> None:
    infer = parse_infer_request(torchserve_body([b"a"], [b"p", b"q"], {}))
    assert (infer.fields["image_0"], infer.fields["prompt_0"], infer.fields["prompt_1"]) == (b"a", b"p", b"q")
    assert "image_1" not in infer.fields


def test_calls_that_skip_the_gateway_and_unknown_outputs_are_refused() -> None:
    data = torchserve_body([b"a", b"b"], [b"p", b"q"], {})
    body = json.loads(data["body"])
    body["inputs"] = [t for t in body["inputs"] if t["name"] != gateway_oip.GATEWAY_INPUT]
    with pytest.raises(ConfigError, match="did not come through the gateway"):
        parse_infer_request({"body": json.dumps(body).encode()})
    with pytest.raises(ConfigError, match="this model's outputs are 'frames' and 'metadata'"):
        parse_infer_request(torchserve_body([b"a", b"b"], [b"p", b"q"], {}, outputs=["gif"]))
    body["inputs"].append({"name": "image_0", "datatype": "BYTES", "shape": [1], "data": []})
    with pytest.raises(ConfigError, match=r"unknown input tensor\(s\) \['image_0'\]"):
        parse_infer_request({"body": json.dumps(body).encode()})


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ConfigError("{field} is not a readable image", field="image_1"),
         "input tensor 'images' element 1 is not a readable image"),
        (ConfigError("{field} is 2001 characters", field="prompt_0", kind="prompt"),
         "input tensor 'prompts' element 0 is 2001 characters"),
        (ConfigError("{field} must be the 64-hex-digit image_key", field="image_ref_2"),
         "input tensor 'images' element 2 (ref:<image_key>) must be the 64-hex-digit image_key"),
        (ConfigError("{field} is not valid JSON: {field}", field="options"),
         "the request parameters (options) is not valid JSON: {field}"),  # request text left alone
        (CacheMiss("{field}: image 0123... is not in this server's cache", field="image_ref_1"),
         "input tensor 'images' element 1 (ref:<image_key>): image 0123... is not in this server's cache"),
        (ConfigError("num_frames must be between 2 and 256"), "num_frames must be between 2 and 256"),
        (ConfigError("field 'image_1' named in text only"), "field 'image_1' named in text only"),  # no regex
    ],
)
def test_native_errors_name_tensors_from_their_field(error: ConfigError | CacheMiss, message: str) -> None:
    assert oip_message(error) == message


def test_a_native_parser_error_carries_the_field_the_oip_message_names() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_request(parse_infer_request(torchserve_body([b"a", b"b"], [b"p", b"q"], {})).fields, MorphConfig())
    assert raised.value.field == "image_0"
    assert oip_message(raised.value).startswith("input tensor 'images' element 0 is not a readable image")


def test_the_response_body_is_what_the_gateway_decodes() -> None:
    """handler -> (TorchServe writes each BYTES element as JSON text) -> guard.oip -> client."""
    request = parse_infer_request(torchserve_body([b"a", b"b"], [b"p", b"q"], {}))
    parts = [wire.Part("morph.gif", "image/gif", b"GIF89a\x00\x01"),
             wire.Part("frame_000.png", "image/png", b"\x89PNG\x00")]
    body = json.loads(response_body(request, MODEL, "1.0", {"num_frames": 1, "seed": 3}, parts))
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-1", MODEL, "1.0")
    response = oip_proto.load()["ModelInferResponse"](id=body["id"])
    for output in body["outputs"]:
        tensor = response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        tensor.contents.bytes_contents.extend(json.dumps(e).encode() for e in output["data"])  # Gson's toString()
    gateway_oip.client_response(response)
    result = triton.InferResult(triton_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    assert list(result.as_numpy("frames")) == [p.data for p in parts]
    metadata = json.loads(result.as_numpy("metadata")[0])
    assert metadata["seed"] == 3 and metadata["type"] == "result"
    assert metadata["parts"] == [{"name": "morph.gif", "mime": "image/gif", "size": 8},
                                 {"name": "frame_000.png", "mime": "image/png", "size": 5}]


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    with TorchServeProcess(tmp_path_factory.mktemp("torchserve-oip") / "server", model_store) as process:
        yield process


@pytest.fixture()
def oip_client(server: TorchServeProcess):
    client = triton.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


def auth(server: TorchServeProcess) -> dict[str, str]:
    return {"authorization": f"Bearer {server.key()}"}


def infer_inputs(images: list[bytes], prompts: list[str]) -> list[triton.InferInput]:
    tensors = []
    for name, elements in (("images", images), ("prompts", [p.encode() for p in prompts])):
        tensor = triton.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
        tensors.append(tensor)
    return tensors


def oip_morph(client: triton.InferenceServerClient, server: TorchServeProcess, images: list[bytes],
              prompts: list[str], options: dict, timeout_s: float = 600) -> triton.InferResult:
    """Scalar options as parameters; a list of formats inside the string parameter `options`."""
    formats = options.get("format")
    parameters = {k: v for k, v in options.items() if k != "format"}
    if formats is not None:
        parameters["options"] = json.dumps({"format": formats})
    return client.infer(MODEL, infer_inputs(images, prompts), parameters=parameters, headers=auth(server),
                        client_timeout=timeout_s, request_id="oip-test")


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value.status(), error.value.message()


@pytest.mark.slow
def test_oip_and_native_give_identical_frames(server: TorchServeProcess, oip_client) -> None:
    images, prompts = demo_inputs()
    options = {**TINY, "seed": 23, "format": ["gif", "png"]}
    started = time.perf_counter()
    result = oip_morph(oip_client, server, images, prompts, options)
    oip_s = time.perf_counter() - started
    frames = list(result.as_numpy("frames"))
    metadata = json.loads(result.as_numpy("metadata")[0])
    assert result.get_response().id == "oip-test" and result.get_response().model_name == MODEL
    started = time.perf_counter()
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file)) as native_client:
        native = native_client.morph(images, prompts, options, deadline_s=600)
    native_s = time.perf_counter() - started
    assert [p.name for p in native.parts] == [p["name"] for p in metadata["parts"]] == \
        ["morph.gif"] + [f"frame_{i:03d}.png" for i in range(TINY["num_frames"])]
    assert frames == [p.data for p in native.parts]  # byte-identical GIF and PNG frames
    assert metadata["seed"] == native.metadata["seed"] == 23
    assert metadata["alphas"] == native.metadata["alphas"]
    assert metadata["worker_pid"] == native.metadata["worker_pid"] == server.worker_pid()
    print(f"\nOIP ModelInfer {oip_s:.2f} s, native Predictions {native_s:.2f} s (LoRAs cached), "
          f"{len(frames)} parts, {sum(map(len, frames))} bytes, identical")


@pytest.mark.slow
def test_oip_outputs_an_animated_webp_lossless_or_lossy(server: TorchServeProcess, oip_client) -> None:
    """WebP through ModelInfer: its options as parameters (`webp_lossless` a bool, `webp_quality`
    an int), the WebP an element of output `frames`. Lossless, it decodes to exactly the PNG
    frames of the same morph; lossy, it holds every frame in fewer bytes; a quality out of range
    is INVALID_ARGUMENT naming the bounds."""
    images, prompts = demo_inputs()
    quick = {"num_frames": 3, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False, "seed": 31}
    lossless = oip_morph(oip_client, server, images, prompts, {**quick, "format": ["webp", "png"], "webp_lossless": True})
    webp, *pngs = list(lossless.as_numpy("frames"))
    metadata = json.loads(lossless.as_numpy("metadata")[0])
    assert [p["mime"] for p in metadata["parts"]] == ["image/webp"] + ["image/png"] * 3
    assert metadata["webp_lossless"] is True
    decoded, _ = webp_frames(webp)
    assert len(decoded) == len(pngs) == 3
    for frame, png in zip(decoded, pngs):
        assert np.array_equal(frame, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    lossy = oip_morph(oip_client, server, images, prompts, {**quick, "format": ["webp"], "webp_quality": 30})
    (small,) = list(lossy.as_numpy("frames"))
    assert json.loads(lossy.as_numpy("metadata")[0])["webp_quality"] == 30
    assert len(webp_frames(small)[0]) == 3 and len(small) < len(webp)
    print(f"\nOIP WebP of 3 frames: lossless {len(webp)} bytes, lossy at 30 {len(small)} bytes")
    code, message = status_of(lambda: oip_morph(oip_client, server, images, prompts,
                                                {**quick, "format": ["webp"], "webp_quality": 101}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "webp_quality must be between 0 and 100, got 101" in message


@pytest.mark.slow
def test_oip_images_by_reference_give_the_same_frames(server: TorchServeProcess, oip_client) -> None:
    """An element b"ref:<image_key>" names an image a previous result returned: no upload, and
    the same morph (hits in the cache) as with the images themselves."""
    images, prompts = demo_inputs()
    options = {**TINY, "seed": 29}
    first = oip_morph(oip_client, server, images, prompts, options)
    keys = [entry["image_key"] for entry in json.loads(first.as_numpy("metadata")[0])["cache"]]
    by_ref = oip_morph(oip_client, server, [f"ref:{key}".encode() for key in keys], prompts, options)
    assert list(by_ref.as_numpy("frames")) == list(first.as_numpy("frames"))
    assert [c["lora"] for c in json.loads(by_ref.as_numpy("metadata")[0])["cache"]] == ["hit", "hit"]
    unknown = [b"ref:" + b"0" * 64, images[1]]  # a well-formed key no result ever returned
    status, message = status_of(lambda: oip_morph(oip_client, server, unknown, prompts, options))
    assert status == "StatusCode.NOT_FOUND" and "input tensor 'images' element 0" in message, message


@pytest.mark.slow
def test_oip_errors_are_clear_and_the_worker_serves_on(server: TorchServeProcess, oip_client) -> None:
    images, prompts = demo_inputs()
    pid = server.worker_pid()
    quick = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False, "seed": 5}
    code, message = status_of(lambda: oip_morph(oip_client, server, [images[0], b"not an image"], prompts, quick))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith("invalid request: input tensor 'images' element 1 is not a readable image (12 bytes")
    assert "org.pytorch" not in message and "diffmorpher:" not in message
    code, message = status_of(lambda: oip_morph(oip_client, server, images, prompts, {**quick, "stream": True}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "ModelInfer is unary" in message
    code, message = status_of(lambda: oip_morph(oip_client, server, images, prompts, {**quick, "num_frames": 0}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "num_frames" in message
    inputs = infer_inputs(images, prompts)
    code, message = status_of(lambda: oip_client.infer("no-such-model", inputs, headers=auth(server)))
    assert code == "StatusCode.NOT_FOUND" and "no-such-model" in message
    code, _ = status_of(lambda: oip_client.infer(MODEL, inputs, headers={"authorization": "Bearer wrong"}))
    assert code == "StatusCode.PERMISSION_DENIED"
    # TorchServe's own OIP port, bypassing the gateway: refused (it would drop the options).
    messages = oip_proto.load()
    direct = grpc.insecure_channel(server.direct_grpc_target)
    model_infer = direct.unary_unary(f"/{oip_proto.TORCHSERVE_SERVICE}/ModelInfer",
                                     request_serializer=messages["ModelInferRequest"].SerializeToString,
                                     response_deserializer=messages["ModelInferResponse"].FromString)
    request = messages["ModelInferRequest"](model_name=MODEL)
    for name, elements in (("images", images), ("prompts", [p.encode() for p in prompts])):
        request.inputs.add(name=name, datatype="BYTES", shape=[2]).contents.bytes_contents.extend(elements)
    with pytest.raises(grpc.RpcError) as error:
        model_infer(request, metadata=list(auth(server).items()), timeout=60)
    direct.close()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "did not come through the gateway" in error.value.details()
    assert parse_error(error.value.details())[0] == ErrorCode.INVALID_REQUEST  # the worker's tag
    # The same worker, alive, serves the next request.
    result = oip_morph(oip_client, server, images, prompts, quick, timeout_s=120)
    assert json.loads(result.as_numpy("metadata")[0])["num_frames"] == 2
    assert server.worker_pid() == pid
    assert oip_client.is_model_ready(MODEL, headers=auth(server))
    metadata = oip_client.get_model_metadata(MODEL, headers=auth(server))
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("images", "BYTES"), ("prompts", "BYTES")]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("frames", "BYTES"), ("metadata", "BYTES")]


@pytest.mark.slow
def test_an_oip_deadline_stops_the_morph_on_the_worker(server: TorchServeProcess, oip_client) -> None:
    """A 3 s client_timeout on a morph of ~2 minutes (1500 LoRA steps, a seed no other test uses):
    the client gets DEADLINE_EXCEEDED and the worker, stopped within a step, serves the next. The
    same worker process: TorchServe 0.12 restarts a worker whose OIP error answer meets a call
    already closed, so the gateway leaves that call open for the worker to end."""
    images, prompts = demo_inputs()
    pid = server.worker_pid()
    long_morph = {**TINY, "lora_steps": 1500, "seed": 31}
    started = time.perf_counter()
    code, _ = status_of(lambda: oip_morph(oip_client, server, images, prompts, long_morph, timeout_s=3))
    assert code == "StatusCode.DEADLINE_EXCEEDED"
    quick = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False, "seed": 5}
    result = oip_morph(oip_client, server, images, prompts, quick, timeout_s=60)
    freed_s = time.perf_counter() - started
    assert json.loads(result.as_numpy("metadata")[0])["num_frames"] == 2
    assert freed_s < 30, freed_s
    assert server.worker_pid() == pid
    print(f"\nModelInfer deadline 3 s: the next ModelInfer answered {freed_s:.1f} s after the first began")
