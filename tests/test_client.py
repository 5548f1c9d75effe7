"""The gRPC client: message framing, request building, tokens, retries, stub generation, and
wire compatibility of our inference.proto with the one inside TorchServe's model-server.jar.

Client behaviours that a real TorchServe cannot be made to show on demand (UNAVAILABLE then
success, a >4 MiB answer) are checked against a small in-process gRPC server built from the
same generated stubs; everything else end to end is in test_e2e_torchserve.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from grpc_api import stubs

from morph_protocol import wire
from morph_protocol.errors import ErrorCode, format_error
from client.__main__ import format_for, main
from morph_protocol.keyfile import TokenError, TokenSource, read_key_file
from client.morph_client import MorphClient, MorphClientError, MorphResult, build_input
from tests.conftest import REPO_ROOT

# ---------------------------------------------------------------------------- framing


def test_message_round_trip() -> None:
    parts = [wire.Part("morph.gif", "image/gif", b"GIF89a..."), wire.Part("a.png", "image/png", b"\x89PNG")]
    payload = wire.encode_message(wire.TYPE_RESULT, {"alphas": [0.0, 1.0], "seed": 3}, parts)
    message = wire.decode_message(payload)
    assert message.type == wire.TYPE_RESULT
    assert message.header["alphas"] == [0.0, 1.0] and message.header["seed"] == 3
    assert message.parts == parts


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"<html>502 Bad Gateway</html>", "not a morph message"),
        (b"DM", "too short"),
        (wire.encode_message(wire.TYPE_FRAME, {}, [wire.Part("f.png", "image/png", b"12345")])[:-2], "truncated"),
        (wire.encode_message(wire.TYPE_PROGRESS, {"stage": "lora"}) + b"x", "trailing"),
    ],
)
def test_bad_payloads_are_reported(payload: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.decode_message(payload)


def test_unknown_message_type_is_refused() -> None:
    with pytest.raises(wire.WireError, match="unknown message type"):
        wire.encode_message("banner", {})


# ---------------------------------------------------------------------------- requests


def test_build_input_follows_the_schema() -> None:
    fields = build_input([b"a", b"b", b"c"], ["p0", "p1", "p2"], {"num_frames": 8}, stream=True)
    assert fields["image_2"] == b"c" and fields["prompt_1"] == b"p1"
    assert json.loads(fields["options"]) == {"num_frames": 8}
    assert fields["stream"] == b"true"
    assert "stream" not in build_input([b"a", b"b"], ["x", "y"], None, stream=False)


@pytest.mark.parametrize(
    ("images", "prompts", "match"),
    [([b"a"], ["x"], "at least 2 images, or one image and 2 to 8 prompts"), ([b"a"], ["x"] * 9, "got 1 image and 9"),
     ([b"a", b"b"], ["x"], "one prompt per image"), ([b"a"] * 9, ["x"] * 9, "at most")],
)
def test_build_input_rejects_bad_shapes(images, prompts, match) -> None:
    with pytest.raises(MorphClientError, match=match):
        build_input(images, prompts, None, stream=False)


def test_one_image_and_two_prompts_is_a_request_and_its_made_endpoints_are_saved(tmp_path) -> None:
    fields = build_input([b"a"], ["a red circle", "a blue circle"], None, stream=False)
    assert (fields["image_0"], fields["prompt_0"], fields["prompt_1"]) == (b"a", b"a red circle", b"a blue circle")
    assert "image_1" not in fields
    parts = [wire.Part("morph.gif", "image/gif", b"GIF89a"), wire.Part("endpoint_1.png", wire.MIME_ENDPOINT, b"\x89PNG1")]
    written = MorphResult({}, parts).save_endpoints(tmp_path / "out" / "morph.gif")
    assert written == [tmp_path / "out" / "morph.endpoint_1.png"]
    assert written[0].read_bytes() == b"\x89PNG1"


def test_loras_travel_as_lora_fields_and_come_back_as_files(tmp_path: Path) -> None:
    fields = build_input([b"a", b"b", b"c"], ["p0", "p1", "p2"], None, stream=False, loras=[None, b"LORA1", None])
    assert fields["lora_1"] == b"LORA1" and "lora_0" not in fields and "lora_2" not in fields
    with pytest.raises(MorphClientError, match="one LoRA \\(or None\\) per image \\(or prompt, with one image\\): 2 images, 1 LoRAs"):
        build_input([b"a", b"b"], ["x", "y"], None, stream=False, loras=[b"x"])
    one = build_input([b"a"], ["p0", "p1", "p2"], None, stream=False, loras=[None, None, b"LORA2"])
    assert one["lora_2"] == b"LORA2" and "lora_0" not in one  # one image: one LoRA per prompt's endpoint
    with pytest.raises(MorphClientError, match="1 image and 2 prompts, 1 LoRAs"):
        build_input([b"a"], ["x", "y"], None, stream=False, loras=[b"x"])
    with pytest.raises(MorphClientError, match="LoRA 0 is 0 bytes"):
        build_input([b"a", b"b"], ["x", "y"], None, stream=False, loras=[b"", None])
    result = MorphResult({}, [wire.Part("frame_0.png", "image/png", b"png"),
                              wire.Part("lora_0.safetensors", wire.MIME_SAFETENSORS, b"zero"),
                              wire.Part("../../lora_1.safetensors", wire.MIME_SAFETENSORS, b"one")])
    written = result.save_loras(tmp_path / "loras")
    assert written == [tmp_path / "loras" / "lora_0.safetensors", tmp_path / "loras" / "lora_1.safetensors"]
    assert [path.read_bytes() for path in written] == [b"zero", b"one"]
    with pytest.raises(MorphClientError, match="return_loras=true"):
        MorphResult({}, []).save_loras(tmp_path / "none")


def test_cli_lora_arguments(tmp_path: Path) -> None:
    from client.__main__ import _options, _read_loras, build_parser

    (tmp_path / "l.safetensors").write_bytes(b"LORA")
    parser = build_parser()
    args = parser.parse_args(["morph", "a.png", "b.png", "--lora", f"1={tmp_path / 'l.safetensors'}",
                              "--save-loras", str(tmp_path / "out")])
    assert _read_loras(args) == [None, b"LORA"]
    assert _options(args, ["gif"])["return_loras"] is True
    assert _read_loras(parser.parse_args(["morph", "a.png", "b.png"])) is None
    with pytest.raises(SystemExit, match="there are only 2 images"):
        _read_loras(parser.parse_args(["morph", "a.png", "b.png", "--lora", f"2={tmp_path / 'l.safetensors'}"]))
    one = parser.parse_args(["morph", "a.png", "--prompt", "p0", "--prompt", "p1", "--lora", f"1={tmp_path / 'l.safetensors'}"])
    assert _read_loras(one) == [None, b"LORA"]  # one image: the made endpoint's LoRA
    with pytest.raises(SystemExit, match="there are only 2 prompts"):
        _read_loras(parser.parse_args(["morph", "a.png", "--prompt", "p0", "--prompt", "p1",
                                       "--lora", f"2={tmp_path / 'l.safetensors'}"]))
    with pytest.raises(SystemExit, match="cannot read LoRA"):
        _read_loras(parser.parse_args(["morph", "a.png", "b.png", "--lora", f"0={tmp_path / 'missing'}"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["morph", "a.png", "b.png", "--lora", "nonsense"])

def test_format_from_output_suffix() -> None:
    assert format_for(Path("a.gif"), None) == "gif"
    assert format_for(Path("a.mp4"), None) == "mp4"
    assert format_for(Path("frames.zip"), None) == "frames-zip"
    assert format_for(Path("out/frames"), None) == "png"
    assert format_for(Path("a.gif"), "mp4") == "mp4"
    assert format_for(Path("a.png"), "png") == "png"
    with pytest.raises(SystemExit, match=r"'a\.png'.*\.gif \(gif\)"):
        format_for(Path("a.png"), None)  # a frame directory has no suffix: one rule, morph_protocol.formats


def test_webp_options_of_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from client.__main__ import _options, build_parser

    assert format_for(Path("out/x.webp"), None) == "webp"
    morph = ["morph", "a.png", "b.png", "--out", "x.webp"]
    args = build_parser().parse_args([*morph, "--webp-quality", "40"])
    assert _options(args, ["webp"]) == {"webp_quality": 40, "format": "webp"}
    args = build_parser().parse_args([*morph, "--webp-lossless", "--out", "y.gif"])
    assert _options(args, ["webp", "gif"]) == {"webp_lossless": True, "format": ["webp", "gif"]}
    assert "webp_quality" not in _options(build_parser().parse_args(morph), ["webp"])  # the server's default
    for value in ("101", "-1", "high"):  # refused before any image is read or call made
        with pytest.raises(SystemExit):
            build_parser().parse_args([*morph, "--webp-quality", value])
        error = capsys.readouterr().err
        assert "--webp-quality" in error and ("between 0 and 100" in error or "whole number" in error), error


# ---------------------------------------------------------------------------- tokens


def write_keys(path: Path, inference: str) -> Path:
    path.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": inference}, "API": {"key": "a"}}))
    return path


def test_token_precedence_and_refresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFMORPHER_TOKEN", raising=False)
    key_file = write_keys(tmp_path / "key_file.json", "first")
    tokens = TokenSource(key_file=key_file)
    assert tokens.metadata() == [("authorization", "Bearer first")]
    write_keys(key_file, "second")
    assert tokens.get() == "second"  # the file changed (the guard rotated the key): re-read
    write_keys(key_file, "third!")
    assert tokens.refresh() is True and tokens.get() == "third!"
    assert tokens.refresh() is False  # unchanged: no point retrying
    assert TokenSource(token="explicit", key_file=key_file).get() == "explicit"
    monkeypatch.setenv("DIFFMORPHER_TOKEN", "from-env")
    assert TokenSource(key_file=key_file).get() == "from-env"
    assert TokenSource(key_file=key_file).refreshable is False
    assert TokenSource(enabled=False).metadata() == []


def test_key_file_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="not found"):
        read_key_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TokenError, match="not valid JSON"):
        read_key_file(tmp_path / "bad.json")
    (tmp_path / "nokey.json").write_text("{}")
    with pytest.raises(TokenError, match="no 'inference' key"):
        read_key_file(tmp_path / "nokey.json")


# ---------------------------------------------------------------------------- dependencies and stubs


def test_client_imports_no_torch_diffusers_or_core() -> None:
    code = (
        "import sys; import client.morph_client, client.__main__, morph_protocol.wire, morph_protocol.keyfile;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'diffmorpher', 'ts') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    requirements = (REPO_ROOT / "client" / "requirements.txt").read_text().lower()
    assert "torch" not in requirements and "diffusers" not in requirements


def test_stubs_regenerate_into_a_package(tmp_path: Path) -> None:
    generated = stubs.generate(tmp_path)
    names = {p.name for p in generated}
    assert {"inference_pb2.py", "inference_pb2_grpc.py", "__init__.py"} <= names
    grpc_module = (tmp_path / "grpc_api" / "_generated" / "inference_pb2_grpc.py").read_text()
    assert "from grpc_api._generated import inference_pb2" in grpc_module


def descriptor_set(
    proto_root: Path, proto: str, extra_includes: list[Path], out: Path
) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    includes = [f"--proto_path={p}" for p in [proto_root, *extra_includes, well_known]]
    args = ["protoc", *includes, "--include_imports", f"--descriptor_set_out={out}", str(proto_root / proto)]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def shape(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """What decides wire compatibility: package, field numbers/types, methods, streaming."""
    messages = {
        m.name: {(f.number, f.name, f.type, f.label, f.proto3_optional) for f in m.field}
        for m in file.message_type
        if m.name in ("PredictionsRequest", "PredictionResponse", "TorchServeHealthResponse")
    }
    services = {
        s.name: {(m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method}
        for s in file.service
    }
    return {"package": file.package, "messages": messages, "services": services}


def test_our_proto_is_wire_compatible_with_torchserves(tmp_path: Path) -> None:
    jar = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "ts" / "frontend" / "model-server.jar"
    if not jar.is_file():
        pytest.skip("torchserve is not installed here (client-only box)")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with zipfile.ZipFile(jar) as archive:
        (theirs / "inference.proto").write_bytes(archive.read("proto/inference.proto"))
    # google/rpc/status.proto is imported but not shipped: the fields of google.rpc.Status.
    rpc = tmp_path / "rpc_include" / "google" / "rpc"
    rpc.mkdir(parents=True)
    (rpc / "status.proto").write_text(
        'syntax = "proto3"; package google.rpc; import "google/protobuf/any.proto";\n'
        "message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }\n"
    )
    their_set = descriptor_set(theirs, "inference.proto", [tmp_path / "rpc_include"], tmp_path / "theirs.pb")
    our_set = descriptor_set(REPO_ROOT / "grpc_api" / "proto", "inference.proto", [], tmp_path / "ours.pb")
    their_shape, our_shape = shape(their_set.file[-1]), shape(our_set.file[-1])
    assert our_shape == their_shape
    # PredictionResponse.status: a different message name, the same fields as google.rpc.Status.
    ours = {m.name: m for m in our_set.file[-1].message_type}["RpcStatus"]
    status = [m for f in their_set.file if f.package == "google.rpc" for m in f.message_type][0]
    assert {(f.number, f.type, f.label) for f in ours.field} == {(f.number, f.type, f.label) for f in status.field}


# ---------------------------------------------------------------------------- behaviour against a local gRPC server


PB2, PB2_GRPC = stubs.load()


class FlakyInference(PB2_GRPC.InferenceAPIsServiceServicer):
    """Answers UNAVAILABLE `failures` times, then a result of `size` bytes; records metadata."""

    def __init__(self, failures: int, size: int = 16, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 on_failure=None) -> None:
        self.failures = failures
        self.size = size
        self.code = code
        self.on_failure = on_failure
        self.calls = 0
        self.auth: list[str] = []

    def Predictions(self, request, context):  # noqa: N802 - gRPC method name
        self.calls += 1
        self.auth.append(dict(context.invocation_metadata()).get("authorization", ""))
        if self.calls <= self.failures:
            if self.on_failure is not None:
                self.on_failure()
            context.abort(self.code, f"failure {self.calls}")
        part = wire.Part("morph.gif", "image/gif", b"G" * self.size)
        return PB2.PredictionResponse(prediction=wire.encode_message(wire.TYPE_RESULT, {"num_frames": 2}, [part]))


@pytest.fixture()
def local_server():
    servers = []

    def start(servicer: FlakyInference) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
            ("grpc.max_send_message_length", 64 * 2**20)])
        PB2_GRPC.add_InferenceAPIsServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


def test_unavailable_is_retried_then_succeeds(local_server) -> None:
    servicer = FlakyInference(failures=2)
    with MorphClient(local_server(servicer), tokens=TokenSource(token="k"), backoff_s=0.01) as client:
        result = client.morph([b"a", b"b"], ["x", "y"], {})
    assert servicer.calls == 3 and result.metadata["num_frames"] == 2
    assert servicer.auth == ["Bearer k"] * 3


def test_calls_spread_over_every_address_a_target_resolves_to(local_server) -> None:
    """Several replicas behind one name (a headless Service): round_robin, not the first only."""
    replicas = [FlakyInference(failures=0), FlakyInference(failures=0)]
    addresses = [local_server(replica).removeprefix("127.0.0.1:") for replica in replicas]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in addresses)
    with MorphClient(target, tokens=TokenSource(token="k")) as client:
        for _ in range(6):
            client.morph([b"a", b"b"], ["x", "y"], {})
    # round_robin sends to the replicas that are connected; while the second connects the first
    # may take a call more (seen: 4/2), pick_first sends all 6 to one.
    assert sum(replica.calls for replica in replicas) == 6 and min(replica.calls for replica in replicas) >= 2


def test_other_errors_are_not_retried_and_carry_the_message(local_server) -> None:
    servicer = FlakyInference(failures=5, code=grpc.StatusCode.INVALID_ARGUMENT)
    with MorphClient(local_server(servicer), tokens=TokenSource(token="k"), backoff_s=0.01) as client:
        with pytest.raises(MorphClientError) as raised:
            client.morph([b"a", b"b"], ["x", "y"], {})
    assert servicer.calls == 1
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "failure 1" in str(raised.value)


def test_permission_denied_rereads_the_key_file_once(local_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DIFFMORPHER_TOKEN", raising=False)
    key_file = write_keys(tmp_path / "key_file.json", "old")
    tokens = TokenSource(key_file=key_file)
    tokens.get()
    # The key is rotated while the first call is in flight: that call is denied.
    servicer = FlakyInference(failures=1, code=grpc.StatusCode.PERMISSION_DENIED,
                              on_failure=lambda: write_keys(key_file, "new"))
    with MorphClient(local_server(servicer), tokens=tokens) as client:
        client.morph([b"a", b"b"], ["x", "y"], {})
    assert servicer.auth == ["Bearer old", "Bearer new"]


def test_answers_over_grpcs_default_4mib_are_received(local_server) -> None:
    servicer = FlakyInference(failures=0, size=6 * 2**20)
    with MorphClient(local_server(servicer), tokens=TokenSource(token="k")) as client:
        result = client.morph([b"a", b"b"], ["x", "y"], {})
    assert len(result.part_for("gif").data) == 6 * 2**20


def test_cli_reports_unreachable_server_clearly(capsys) -> None:
    code = main(["--target", "127.0.0.1:1", "--token", "k", "--retries", "0", "ping"])
    assert code == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_full_queue_is_reported_as_busy_not_as_a_server_failure():
    import grpc

    from client.morph_client import BUSY_HINT, MorphClientError
    from morph_protocol.torchserve import BUSY_MESSAGE


    busy = MorphClientError(grpc.StatusCode.INTERNAL, f'Model "diffmorpher" {BUSY_MESSAGE}.')
    assert busy.busy and BUSY_HINT in str(busy) and busy.error_code is None  # TorchServe's words only
    failed = MorphClientError(grpc.StatusCode.INTERNAL, "morph failed: RuntimeError: boom")
    assert not failed.busy and "failed while morphing" in str(failed)
    # From the gateway: the typed code decides, whatever the words.
    gateway_busy = MorphClientError(grpc.StatusCode.UNAVAILABLE, "server busy", error_code=ErrorCode.BUSY)
    assert gateway_busy.busy and gateway_busy.error_code == ErrorCode.BUSY
    quoted = MorphClientError(grpc.StatusCode.UNAVAILABLE, f"not reachable; retry: {BUSY_MESSAGE}",
                              error_code=ErrorCode.UNREACHABLE)
    assert not quoted.busy


def test_the_workers_tag_gives_the_code_and_leaves_the_message_clean() -> None:
    """Talking to TorchServe directly: the code is read from the message's tag."""
    details = format_error(ErrorCode.OUT_OF_MEMORY, "out of memory: reduce") + "\norg.pytorch.serve.X"
    error = MorphClientError(grpc.StatusCode.INTERNAL, details)
    assert (error.error_code, error.details) == (ErrorCode.OUT_OF_MEMORY, "out of memory: reduce")


def test_java_exception_class_is_removed_from_messages() -> None:
    error = MorphClientError(grpc.StatusCode.INVALID_ARGUMENT,
                             "invalid request: bad\norg.pytorch.serve.http.InternalServerException")
    assert error.details == "invalid request: bad"
    busy = MorphClientError(grpc.StatusCode.UNAVAILABLE, "server busy: ... has no worker to serve inference request ...")
    assert busy.busy


def test_requests_carry_their_deadline() -> None:
    import time

    from client.morph_client import build_input

    fields = build_input([b"a", b"b"], ["x", "y"], {}, stream=False, deadline_s=30)
    assert abs(float(fields["deadline"]) - (time.time() + 30)) < 1
    assert "deadline" not in build_input([b"a", b"b"], ["x", "y"], {}, stream=False)



def test_a_key_file_being_rewritten_is_read_once_it_is_whole(tmp_path: Path) -> None:
    """TorchServe truncates and rewrites key_file.json on every rotation: a reader that lands in
    between must wait for the new content, not fail (seen in the soak with 1-minute keys)."""
    import threading
    import time

    key_file = write_keys(tmp_path / "key_file.json", "k0")
    stop = threading.Event()

    def rotate() -> None:
        index = 0
        while not stop.is_set():
            index += 1
            with open(key_file, "w") as stream:  # truncate, then write, like TorchServe
                time.sleep(0.005)
                stream.write(json.dumps({"inference": {"key": f"k{index}"}}))
            time.sleep(0.01)  # whole until the next rotation (seconds in TorchServe, 10 ms here)

    writer = threading.Thread(target=rotate)
    writer.start()
    keys, until = set(), time.monotonic() + 0.5
    try:
        while time.monotonic() < until:
            keys.add(read_key_file(key_file))
    finally:
        stop.set()
        writer.join()
    assert all(key.startswith("k") for key in keys) and len(keys) > 1


class FailingInference(PB2_GRPC.InferenceAPIsServiceServicer):
    """Answers every Predictions call as TorchServe answers a failed job: `code` and `details`
    with the Java exception class appended."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details

    def Predictions(self, request, context):  # noqa: N802 - gRPC method name
        context.abort(self.code, self.details + "\norg.pytorch.serve.http.InternalServerException")


@pytest.mark.parametrize(
    ("upstream_code", "upstream_details", "status", "error_code", "details"),
    [
        # TorchServe answers 507 as INTERNAL: the worker's tag makes it RESOURCE_EXHAUSTED.
        (grpc.StatusCode.INTERNAL, format_error(ErrorCode.OUT_OF_MEMORY, "out of memory: reduce frames"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorCode.OUT_OF_MEMORY, "out of memory: reduce frames"),
        (grpc.StatusCode.INVALID_ARGUMENT, format_error(ErrorCode.INVALID_REQUEST, "invalid request: field 'image_0' is empty"),
         grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST, "invalid request: field 'image_0' is empty"),
        (grpc.StatusCode.INTERNAL, 'Model "diffmorpher" has no worker to serve inference request. Please use scale',
         grpc.StatusCode.UNAVAILABLE, ErrorCode.BUSY, None),
        (grpc.StatusCode.INTERNAL, "morph failed: RuntimeError: boom",  # untagged: no code invented
         grpc.StatusCode.INTERNAL, None, "morph failed: RuntimeError: boom"),
    ],
)
def test_the_gateway_returns_the_code_as_trailing_metadata_and_the_client_reads_it(
    local_server, upstream_code, upstream_details, status, error_code, details
) -> None:
    from guard.gateway import Gateway, GatewayConfig
    from launcher.torchserve import free_ports
    from morph_protocol.errors import ERROR_CODE_METADATA

    upstream = local_server(FailingInference(upstream_code, upstream_details))
    listen = f"127.0.0.1:{free_ports(1)[0]}"
    gateway = Gateway(GatewayConfig(listen, upstream), None).server()
    gateway.start()
    try:
        with MorphClient(listen, tokens=TokenSource(token="k"), retries=0) as client:
            with pytest.raises(MorphClientError) as raised:
                client.morph([b"a", b"b"], ["x", "y"], {})
        rpc_error = raised.value.__cause__
        trailing = dict(rpc_error.trailing_metadata() or ())
    finally:
        gateway.stop(grace=None)
    assert (raised.value.code, raised.value.error_code) == (status, error_code)
    assert trailing.get(ERROR_CODE_METADATA) == (error_code.value if error_code else None)
    assert "diffmorpher:" not in raised.value.details and "org.pytorch" not in raised.value.details
    if details is not None:
        assert raised.value.details == details
    assert raised.value.busy == (error_code == ErrorCode.BUSY)
