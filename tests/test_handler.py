"""The TorchServe handler and its request/response modules, driven in-process with TorchServe's
own Context (no server) and a real pipeline on the tiny random SD folder."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException, list_classes_from_module

from handler import torchserve_handler
from morph_protocol import wire
from morph_protocol.errors import ErrorCode, parse_error
from diffmorpher.config import ConfigError, MorphConfig
from diffmorpher.results import ProgressEvent
from handler.morph_request import parse_request, split_options
from handler.morph_response import ResponseTooLarge, StreamSender, check_size
from handler.torchserve_handler import DiffMorpherHandler

TINY = {"num_frames": 3, "lora_steps": 2, "num_inference_steps": 3, "use_reschedule": False}


def png(colour: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def good_request(**options) -> dict:
    return {"image_0": png("red"), "image_1": png("blue"), "prompt_0": b"a red square",
            "prompt_1": b"a blue square", "options": json.dumps({**TINY, **options}).encode()}


def make_context(model_dir: Path, batch: int = 1, **settings) -> Context:
    config = {"handler": {"model_dir": str(model_dir), "lpips_weights": "", "defaults": {}, **settings}}
    context = Context("diffmorpher", str(model_dir), {}, batch, None, "0.12.0", model_yaml_config=config)
    context.request_ids = {i: f"req-{i}" for i in range(batch)}
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture(scope="module")
def handler(tiny_sd_dir: Path) -> DiffMorpherHandler:
    instance = DiffMorpherHandler()
    instance.initialize(make_context(tiny_sd_dir))
    return instance


def test_module_has_exactly_one_class_for_torchserve() -> None:
    """TorchServe's loader refuses a handler module that defines more than one class."""
    assert list_classes_from_module(torchserve_handler) == [DiffMorpherHandler]


CUDA_CALLS = ("current_device", "set_device", "synchronize", "empty_cache", "mem_get_info", "memory_reserved",
              "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "is_bf16_supported",
              "get_device_properties", "device_count")


def test_a_cpu_worker_on_a_gpu_host_serves_on_the_cpu_and_never_touches_cuda(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive with `deviceType: cpu` on a host with GPUs: TorchServe passes no gpu_id, and
    the worker must load on the CPU without one call into torch.cuda (a handler that picks
    "cuda" itself because a GPU is there would take a GPU it was not given), then morph and
    answer on the CPU, still without torch.cuda (a handler clearing CUDA caches or synchronising
    after each request touches a GPU it was not given). This replaces a grep for "cuda" in
    handler/: device choice is diffmorpher.devices' job, and this is what that protects. The GPU
    host is faked for the load only: torch's own autograd asks for CUDA streams when it believes
    a GPU is there."""
    calls: list[str] = []

    def refuse(name: str):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"torch.cuda.{name} called by a CPU worker")
        return call

    for name in CUDA_CALLS:
        monkeypatch.setattr(torch.cuda, name, refuse(name))
    context = Context("diffmorpher", str(tiny_sd_dir), {}, 1, None, "0.12.0",
                      model_yaml_config={"handler": {"model_dir": str(tiny_sd_dir), "lpips_weights": "",
                                                     "cache_dir": "off"}})
    context.request_ids = {0: "req-0"}
    context.request_processor = [RequestProcessor({})]
    worker = DiffMorpherHandler()
    with monkeypatch.context() as gpu_host:
        gpu_host.setattr(torch.cuda, "is_available", lambda: True)
        worker.initialize(context)
    assert calls == []
    assert worker.pipeline.models.device == torch.device("cpu")
    assert {p.device for p in worker.pipeline.models.unet.parameters()} == {torch.device("cpu")}
    (payload,) = worker.handle([good_request()], context)
    message = wire.decode_message(payload)
    assert message.type == wire.TYPE_RESULT, message.header
    assert (message.header["device"], message.header["dtype"]) == ("cpu", "float32")
    assert calls == []


def test_unary_request_returns_one_result_message(handler: DiffMorpherHandler, tiny_sd_dir: Path) -> None:
    context = make_context(tiny_sd_dir)
    (payload,) = handler.handle([good_request(format=["gif", "png"], seed=5)], context)
    message = wire.decode_message(payload)
    assert message.type == wire.TYPE_RESULT
    assert message.header["num_frames"] == 3 and message.header["seed"] == 5
    assert message.header["alphas"] == [0.0, 0.5, 1.0]
    assert {"lora", "inversion", "frames", "decode_request", "encode_output", "total"} <= set(message.header["timings"])
    assert [p.mime for p in message.parts] == ["image/gif"] + ["image/png"] * 3
    assert Image.open(io.BytesIO(message.parts[0].data)).n_frames == 3
    assert context.get_response_content_type(0) == wire.CONTENT_TYPE
    assert "ts_stream_next" not in context.get_response_headers(0)  # nothing was streamed


def test_streaming_sends_intermediate_responses(handler: DiffMorpherHandler, tiny_sd_dir: Path) -> None:
    context = make_context(tiny_sd_dir)
    ours, theirs = socket.socketpair()
    context.cl_socket = ours
    try:
        (payload,) = handler.handle([{**good_request(), "stream": b"true"}], context)
        theirs.setblocking(False)
        streamed = b""
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            streamed += chunk
    finally:
        ours.close()
        theirs.close()
    assert wire.decode_message(payload).type == wire.TYPE_RESULT
    # Every intermediate response is marked for streaming and carries one framed message.
    assert streamed.count(b"ts_stream_next") >= 3 + 1  # 3 frames + at least one progress
    assert streamed.count(wire.MAGIC) == streamed.count(b"ts_stream_next")
    assert streamed.count(b'"type":"frame"') == 3
    assert context.get_response_headers(0)["ts_stream_next"] == "true"  # turned "false" at the end by TorchServe


def changed_request(change: dict) -> dict:
    """good_request() with the fields in `change` replaced (a value of None removes the field)."""
    request = good_request()
    for key, value in change.items():
        if value is None:
            request.pop(key)
        else:
            request[key] = value
    return request


@pytest.mark.parametrize(
    ("request_change", "message"),
    [
        ({"image_0": b"not an image"}, "field 'image_0' is not a readable image"),
        ({"prompt_1": None}, "missing prompt 'prompt_1'"),
        ({"options": b'{"num_frames": 0}'}, "num_frames must be between 2"),
        ({"options": b'{"frames": 4}'}, "unknown option(s) ['frames']"),
        ({"options": b"{not json"}, "'options' is not valid JSON"),
        ({"options": b'{"format": "webm"}'}, "format must be one of"),
        ({"options": b'{"device": "cpu:1"}'}, "option 'device' is set by the server"),
        ({"stream": b"maybe"}, "'stream' must be true or false"),
        ({"image_9": b"x"}, "unknown field(s) ['image_9']"),
        ({"image_ref_3": b"0" * 64}, "unknown field(s) ['image_ref_3']"),
        ({"image_ref_1": b"0" * 64}, "send either 'image_1' or 'image_ref_1', not both"),
        ({"image_ref_1": b"0" * 64, "image_1": None}, "is not in this server's cache"),
        ({"image_ref_1": b"ab" * 33, "image_1": None}, "must be the 64-hex-digit image_key"),
        ({"image_ref_1": b"x" * 100_000, "image_1": None}, "an image_key has 64 hex digits"),
        ({"image_1": None, "prompt_1": None}, "or one image and at least 2 prompts"),
        ({"image_1": None, **{f"prompt_{i}": b"a square" for i in range(1, 10)}}, "one image takes at most 8 prompts"),
        ({"image_1": None, "options": b'{"endpoint_guidance": 0.5}'}, "endpoint_guidance must be in [1.0, 30.0]"),
    ],
)
def test_bad_requests_are_refused_with_their_code_and_a_specific_message(
    handler: DiffMorpherHandler, tiny_sd_dir: Path, request_change: dict, message: str
) -> None:
    request = changed_request(request_change)
    with pytest.raises(PredictionException) as raised:
        handler.handle([request], make_context(tiny_sd_dir))
    code, text = parse_error(raised.value.message)
    expected = ErrorCode.NOT_FOUND if "cache" in message else ErrorCode.INVALID_REQUEST
    assert (raised.value.error_code, code) == (expected.http_status, expected)
    assert message in text and "diffmorpher:" not in text


def test_one_image_and_three_prompts_return_the_made_endpoints_as_parts(
    handler: DiffMorpherHandler, tiny_sd_dir: Path
) -> None:
    """`image_0` and `prompt_0..prompt_2`: five frames through two made endpoints, each returned
    as its own PNG part (wire.MIME_ENDPOINT, apart from the frame PNGs) and listed in the header;
    the same request gives the same endpoint bytes."""
    request = {"image_0": png("red"), "prompt_0": b"a red square", "prompt_1": b"a blue square",
               "prompt_2": b"a green square", "options": json.dumps({**TINY, "format": ["gif", "png"]}).encode()}
    first, again = (wire.decode_message(handler.handle([dict(request)], make_context(tiny_sd_dir))[0])
                    for _ in range(2))
    assert first.header["num_frames"] == 5 and first.header["segments"] == [0, 0, 1, 1, 1]
    assert [p.name for p in first.parts if p.mime == "image/png"] == [f"frame_{i:03d}.png" for i in range(5)]
    made = [p for p in first.parts if p.mime == wire.MIME_ENDPOINT]
    assert [p.name for p in made] == ["endpoint_1.png", "endpoint_2.png"]
    assert [e["part"] for e in first.header["endpoints"]] == ["endpoint_1.png", "endpoint_2.png"]
    assert Image.open(io.BytesIO(made[0].data)).size == (16, 16)
    assert [p.data for p in made] == [p.data for p in again.parts if p.mime == wire.MIME_ENDPOINT]


def test_oversize_result_is_413_not_a_dead_worker(tiny_sd_dir: Path, handler: DiffMorpherHandler) -> None:
    small = DiffMorpherHandler()
    small.pipeline, small.defaults, small.max_response_bytes = handler.pipeline, handler.defaults, 2000
    with pytest.raises(PredictionException) as raised:
        small.handle([good_request(format="png")], make_context(tiny_sd_dir))
    assert raised.value.error_code == 413
    assert parse_error(raised.value.message)[0] == ErrorCode.TOO_LARGE
    assert "over the server's response limit" in raised.value.message


def test_failures_inside_the_morph_are_500_and_not_retryable(tiny_sd_dir: Path) -> None:
    uninitialised = DiffMorpherHandler()
    with pytest.raises(PredictionException) as raised:
        uninitialised.handle([good_request()], make_context(tiny_sd_dir))
    assert raised.value.error_code == 500 and "not initialized" in raised.value.message


def test_in_a_batch_only_the_bad_request_fails(handler: DiffMorpherHandler, tiny_sd_dir: Path) -> None:
    context = make_context(tiny_sd_dir, batch=2)
    bad = {**good_request(), "image_1": b""}
    good, error = handler.handle([good_request(), bad], context)
    assert wire.decode_message(good).type == wire.TYPE_RESULT
    assert parse_error(error.decode()) == (ErrorCode.INVALID_REQUEST, "invalid request: field 'image_1' is empty; "
                                           "expected an encoded image (PNG, JPEG, WebP)")
    assert context.get_response_status(1)[0] == 400



# ---------------------------------------------------------------------------- LoRAs out and in
def test_returned_loras_sent_back_give_the_same_frames_without_a_fit(handler: DiffMorpherHandler,
                                                                     tiny_sd_dir: Path) -> None:
    """return_loras adds one diffusers LoRA file per image; sent back as lora_<i> they replace
    the fits and the frames are the same bytes."""
    # A seed of its own: the handler's cache holds the LoRAs other tests fitted.
    (payload,) = handler.handle([good_request(format="png", return_loras=True, seed=11)], make_context(tiny_sd_dir))
    first = wire.decode_message(payload)
    loras = [p for p in first.parts if p.mime == wire.MIME_SAFETENSORS]
    assert [p.name for p in loras] == ["lora_0.safetensors", "lora_1.safetensors"] == first.header["lora_parts"]
    assert first.header["work"]["lora_fits"] == 2
    sent = {**good_request(format="png", seed=11), "lora_0": loras[0].data, "lora_1": loras[1].data}
    (payload,) = handler.handle([sent], make_context(tiny_sd_dir))
    second = wire.decode_message(payload)
    assert second.header["work"] == {"lora_fits": 0, "lora_steps": 0, "inversions": 2}
    assert second.header["lora_parts"] == [] and all(p.mime == "image/png" for p in second.parts)
    assert [p.data for p in second.parts] == [p.data for p in first.parts if p.mime == "image/png"]


def test_one_image_returns_a_lora_per_endpoint_and_takes_them_back(handler: DiffMorpherHandler,
                                                                   tiny_sd_dir: Path) -> None:
    """One image and three prompts with return_loras: three LoRA parts (the made endpoints' too)
    beside the made endpoints; sent back as lora_<i>, they replace those fits (frames the same
    bytes), and a lora_3 names no endpoint."""
    request = {"image_0": png("red"), "prompt_0": b"a red square", "prompt_1": b"a blue square",
               "prompt_2": b"a green square"}
    options = {**TINY, "format": "png", "seed": 13}
    (payload,) = handler.handle([{**request, "options": json.dumps({**options, "return_loras": True}).encode()}],
                                make_context(tiny_sd_dir))
    first = wire.decode_message(payload)
    loras = [p for p in first.parts if p.mime == wire.MIME_SAFETENSORS]
    assert [p.name for p in loras] == [f"lora_{i}.safetensors" for i in range(3)] == first.header["lora_parts"]
    assert [p.name for p in first.parts if p.mime == wire.MIME_ENDPOINT] == ["endpoint_1.png", "endpoint_2.png"]
    assert first.header["work"]["lora_fits"] == 3
    sent = {**request, "options": json.dumps(options).encode(), "lora_0": loras[0].data, "lora_1": loras[1].data,
            "lora_2": loras[2].data}
    second = wire.decode_message(handler.handle([sent], make_context(tiny_sd_dir))[0])
    assert (second.header["work"]["lora_fits"], second.header["work"]["lora_steps"]) == (0, 0)
    frames = [p.data for p in first.parts if p.mime == "image/png"]
    assert [p.data for p in second.parts if p.mime == "image/png"] == frames
    with pytest.raises(PredictionException, match="unknown field\\(s\\) \\['lora_3'\\]"):
        handler.handle([{**sent, "lora_3": loras[0].data}], make_context(tiny_sd_dir))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (b"not safetensors", "invalid request: field 'lora_1' is not a safetensors file (15 bytes"),
        (b"", "invalid request: field 'lora_1' is empty"),
        ("too big", "bytes; a LoRA may have at most 67108864 bytes"),
        ("wrong shape", "invalid request: field 'lora_1' has 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight' of shape [4, 33]"),
        ("unknown key", "invalid request: field 'lora_1' has the unknown key 'unet.conv_in.lora_A.weight'"),
    ],
)
def test_a_bad_sent_lora_is_invalid_argument_naming_it(handler: DiffMorpherHandler, tiny_sd_dir: Path,
                                                      lora, message: str) -> None:
    import safetensors.torch

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    data = {
        "too big": b"\0" * (64 * 2**20 + 1),
        "wrong shape": safetensors.torch.save({f"{module}.lora_A.weight": torch.zeros(4, 33),
                                               f"{module}.lora_B.weight": torch.zeros(32, 4)}),
        "unknown key": safetensors.torch.save({"unet.conv_in.lora_A.weight": torch.zeros(4, 4)}),
    }.get(lora, lora)
    with pytest.raises(PredictionException) as raised:
        handler.handle([{**good_request(), "lora_1": data}], make_context(tiny_sd_dir))
    code, text = parse_error(raised.value.message)
    assert (raised.value.error_code, code) == (400, ErrorCode.INVALID_REQUEST)
    assert message in text

# ---------------------------------------------------------------------------- request parsing
@pytest.mark.parametrize(
    ("request_change", "field", "message"),
    [
        ({"image_1": b"not an image"}, "image_1", "field 'image_1' is not a readable image"),
        ({"prompt_0": "a" * 2001}, "prompt_0", "prompt 'prompt_0' is 2001 characters; at most 2000 characters"),
        ({"prompt_1": None}, "prompt_1", "missing prompt 'prompt_1' for image 1"),
        ({"options": b"[1]"}, "options", "field 'options' must be a JSON object, got list"),
        ({"image_ref_0": b"xyz", "image_0": None}, "image_ref_0", "field 'image_ref_0' must be the 64-hex-digit"),
        ({"options": b'{"num_frames": 0}'}, None, "num_frames must be between 2 and 256"),
        ({"lora_0": b""}, "lora_0", "field 'lora_0' is empty"),
        ({"lora_2": b"x"}, None, "unknown field(s) ['lora_2']"),
    ],
)
def test_errors_name_their_request_field_as_data(request_change: dict, field: str | None, message: str) -> None:
    """The field is an attribute (the OIP path names tensors from it), the text says it too."""
    request = changed_request(request_change)
    with pytest.raises(ConfigError) as raised:
        parse_request(request, MorphConfig())
    assert message in str(raised.value) and raised.value.field == field




def test_rest_style_fields_are_accepted() -> None:
    """REST multipart text fields arrive as str and JSON parts already parsed."""
    request = parse_request(
        {"image_0": bytearray(png("red")), "image_1": png("blue"), "prompt_0": "a", "prompt_1": "b",
         "options": {"num_frames": 5, "format": ["gif", "mp4"], "frame_duration_ms": 50}, "stream": "false"},
        MorphConfig(),
    )
    assert request.prompts == ["a", "b"] and request.config.num_frames == 5
    assert request.formats == ["gif", "mp4"] and request.outputs[1].frame_duration_ms == 50
    assert request.stream is False and request.images[0].mode == "RGB"


def test_server_defaults_apply_under_request_options() -> None:
    defaults = MorphConfig(num_frames=8, lora_steps=10)
    config, outputs = split_options({"lora_steps": 3}, defaults)
    assert (config.num_frames, config.lora_steps) == (8, 3)
    assert [o.format for o in outputs] == ["gif"]
    with pytest.raises(ConfigError, match="twice"):
        split_options({"format": ["gif", "gif"]}, defaults)


def test_webp_options_reach_the_webp_output_and_are_refused_where_nothing_reads_them() -> None:
    defaults = MorphConfig()
    _, outputs = split_options({"format": ["gif", "webp"], "webp_quality": 35}, defaults)
    assert [(o.format, o.webp_quality, o.webp_lossless) for o in outputs] == [("gif", 35, False), ("webp", 35, False)]
    _, (lossless,) = split_options({"format": "webp", "webp_lossless": True}, defaults)
    assert (lossless.webp_lossless, lossless.webp_quality) == (True, 80)
    refused = {
        "option(s) ['webp_quality'] apply to the webp format only, and the request asks for ['gif', 'mp4']":
            {"format": ["gif", "mp4"], "webp_quality": 50},
        "option(s) ['webp_lossless'] apply to the webp format only, and the request asks for ['gif']":
            {"webp_lossless": True},
        "webp_quality sets lossy WebP's quality and the request asks for lossless WebP":
            {"format": "webp", "webp_quality": 90, "webp_lossless": True},
        "webp_quality must be between 0 and 100, got 101": {"format": "webp", "webp_quality": 101},
        "webp_quality must be an integer, got 7.5": {"format": "webp", "webp_quality": 7.5},
    }
    for message, options in refused.items():
        with pytest.raises(ConfigError) as caught:
            split_options(options, defaults)
        assert message in str(caught.value), (options, str(caught.value))


def test_a_requested_preset_overrides_server_defaults_and_request_options_override_it() -> None:
    defaults = MorphConfig(num_frames=8, lora_steps=10, num_inference_steps=40)
    config, _ = split_options({"preset": "fast", "num_inference_steps": 20}, defaults)
    assert (config.num_frames, config.lora_steps, config.num_inference_steps) == (8, 100, 20)
    with pytest.raises(ConfigError, match="preset must be one of"):
        split_options({"preset": "slow"}, defaults)


def test_a_rest_body_without_fields_says_how_to_send() -> None:
    with pytest.raises(ConfigError, match="multipart/form-data"):
        parse_request({"body": b"..."}, MorphConfig())


def test_huge_images_are_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    with pytest.raises(ConfigError, match="at most"):
        parse_request({"image_0": buffer.getvalue(), "image_1": png("red"), "prompt_0": "a", "prompt_1": "b"},
                      MorphConfig())


# ---------------------------------------------------------------------------- streaming sender


def test_stream_sender_throttles_progress_but_sends_every_frame() -> None:
    sent: list[bytes] = []
    sender = StreamSender(sent.append, max_bytes=1 << 20, interval_s=3600)
    for step in range(1, 11):
        sender(ProgressEvent(stage="lora", step=step, total=10))
    for index in range(3):
        sender(ProgressEvent(stage="frames", step=index + 1, total=3, frame=Image.new("RGB", (8, 8)),
                             frame_index=index, num_frames=3))
    messages = [wire.decode_message(p) for p in sent]
    progress = [m.header["step"] for m in messages if m.type == wire.TYPE_PROGRESS]
    assert progress == [1, 10]  # first and last step always, the rest throttled
    frames = [m for m in messages if m.type == wire.TYPE_FRAME]
    assert [m.header["index"] for m in frames] == [0, 1, 2]
    assert frames[0].part().name == "frame_000.png" and frames[0].part().mime == "image/png"


def test_check_size() -> None:
    check_size(b"x" * 10, 10, "it")
    with pytest.raises(ResponseTooLarge, match="fewer frames"):
        check_size(b"x" * 11, 10, "the result")


# ---------------------------------------------------------------------------- stopping, memory
def test_an_expired_request_is_not_started(handler: DiffMorpherHandler, tiny_sd_dir: Path) -> None:
    import time

    request = {**good_request(), "deadline": str(time.time() - 2.0).encode()}
    started = time.perf_counter()
    with pytest.raises(PredictionException) as raised:
        handler.handle([request], make_context(tiny_sd_dir))
    assert raised.value.error_code == 504  # TorchServe: gRPC DEADLINE_EXCEEDED
    assert "was not started" in raised.value.message
    assert time.perf_counter() - started < 0.5  # not even the images were decoded


def test_a_deadline_stops_a_running_morph_and_the_worker_serves_on(
    handler: DiffMorpherHandler, tiny_sd_dir: Path
) -> None:
    import time

    long = good_request(lora_steps=2000, num_frames=8)
    deadline = time.time() + 1.0
    with pytest.raises(PredictionException) as raised:
        handler.handle([{**long, "deadline": str(deadline).encode()}], make_context(tiny_sd_dir))
    late = time.time() - deadline
    assert raised.value.error_code == 504 and "during lora" in raised.value.message
    assert late < 1.0, late  # stopped within a step or two of the deadline
    (payload,) = handler.handle([good_request()], make_context(tiny_sd_dir))
    assert wire.decode_message(payload).type == wire.TYPE_RESULT


def test_a_cancel_marker_stops_the_morph_and_heartbeats_record_it(tiny_sd_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading
    import time

    from morph_protocol.control import BUSY, IDLE, ControlDir

    monkeypatch.setenv("DIFFMORPHER_CONTROL_DIR", str(tmp_path))
    worker = DiffMorpherHandler()
    worker.initialize(make_context(tiny_sd_dir))
    control = ControlDir(tmp_path)
    assert control.read_heartbeat(os.getpid()).state == IDLE
    call_id = "0123456789abcdef0123456789abcdef"
    seen: list[str] = []

    def cancel_when_busy() -> None:
        for _ in range(200):
            beat = control.read_heartbeat(os.getpid())
            if beat is not None and beat.state == BUSY:
                seen.append(beat.call_id)
                time.sleep(0.5)
                control.cancel(call_id, "cancelled by the client")
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_busy)
    canceller.start()
    with pytest.raises(PredictionException) as raised:
        worker.handle([{**good_request(lora_steps=2000), "call_id": call_id.encode()}], make_context(tiny_sd_dir))
    canceller.join()
    assert seen == [call_id]
    assert raised.value.error_code == 499 and "cancelled by the client" in raised.value.message
    assert control.read_heartbeat(os.getpid()).state == IDLE
    assert control.cancel_reason(call_id) is None  # the marker is removed with the call


@pytest.mark.parametrize("call_id", [b"../../etc/passwd", b"ABC", b"0" * 33])
def test_a_client_cannot_name_a_marker_path(handler: DiffMorpherHandler, tiny_sd_dir: Path, call_id: bytes) -> None:
    with pytest.raises(PredictionException) as raised:
        handler.handle([{**good_request(), "call_id": call_id}], make_context(tiny_sd_dir))
    assert raised.value.error_code == 400 and "call_id" in raised.value.message


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        MemoryError(),
    ],
    ids=["torch-oom", "cpu-allocator", "memory-error"],
)
def test_out_of_memory_is_507_naming_what_to_reduce_and_the_worker_serves_on(
    handler: DiffMorpherHandler, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    real_call = type(handler.pipeline).__call__

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(type(handler.pipeline), "__call__", exhausted)
    with pytest.raises(PredictionException) as raised:
        handler.handle([good_request()], make_context(tiny_sd_dir))
    assert raised.value.error_code == 507
    code, message = parse_error(raised.value.message)
    assert code == ErrorCode.OUT_OF_MEMORY and message.startswith("out of memory:")
    assert all(option in message for option in ("frame_batch_size", "vae_batch_size", "resolution"))
    monkeypatch.setattr(type(handler.pipeline), "__call__", real_call)
    (payload,) = handler.handle([good_request()], make_context(tiny_sd_dir))
    assert wire.decode_message(payload).type == wire.TYPE_RESULT


@pytest.mark.parametrize("gpu_id, device", [(1, torch.device("cuda", 1)), (None, torch.device("cpu"))],
                         ids=["gpu-1", "no-gpu"])
def test_a_worker_makes_its_assigned_gpu_current_before_loading_on_it(
    tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch, gpu_id: int | None, device: torch.device
) -> None:
    """TorchServe's gpu_id becomes the worker's current CUDA device before anything loads (else
    inductor and index-less "cuda" land on GPU 0 from every worker), and the pipeline loads on
    it in the precision the device picks ("auto"); without one, the CPU and nothing of CUDA."""
    events: list[tuple] = []
    real_load = torchserve_handler.DiffMorpherPipeline.from_pretrained

    def load(source, device=None, dtype="auto", **kwargs):
        events.append(("load", device, dtype))
        return real_load(source, device="cpu", dtype="float32", **kwargs)  # no GPU here: the CPU stands in

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", device)))
    monkeypatch.setattr(torchserve_handler.DiffMorpherPipeline, "from_pretrained", load)
    context = Context("diffmorpher", str(tiny_sd_dir), {}, 1, gpu_id, "0.12.0",
                      model_yaml_config={"handler": {"model_dir": str(tiny_sd_dir), "lpips_weights": "",
                                                     "cache_dir": "off"}})
    DiffMorpherHandler().initialize(context)
    expected_calls = [("set_device", device)] if device.type == "cuda" else []
    assert events == [*expected_calls, ("load", device, "auto")]


def test_a_worker_without_lpips_weights_says_so_at_start_and_in_every_rescheduled_result(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DIFFMORPHER_LPIPS_WEIGHTS", str(tmp_path / "missing.safetensors"))
    worker = DiffMorpherHandler()
    with caplog.at_level("WARNING", logger=torchserve_handler.logger.name):
        worker.initialize(make_context(tiny_sd_dir))
    assert any("LPIPS weights missing" in r.getMessage() and "pixel-l2" in r.getMessage() for r in caplog.records)
    (payload,) = worker.handle([good_request(use_reschedule=True, reschedule_probe_fraction=0.5)], make_context(tiny_sd_dir))
    header = wire.decode_message(payload).header
    assert header["config"]["perceptual_metric"] == "lpips"  # what was asked
    assert (header["perceptual_metric"], header["perceptual_weights"]) == ("pixel-l2", "none")  # what was used


def test_a_worker_with_lpips_weights_names_them(handler: DiffMorpherHandler, tiny_sd_dir: Path) -> None:
    if handler.pipeline is None or handler.pipeline.perceptual is None or handler.pipeline.perceptual.name != "lpips-alex":
        pytest.skip("no LPIPS weights prepared here (make setup prepares them)")
    (payload,) = handler.handle([good_request(use_reschedule=True, reschedule_probe_fraction=0.5)], make_context(tiny_sd_dir))
    header = wire.decode_message(payload).header
    assert header["perceptual_metric"] == "lpips-alex" and header["perceptual_weights"].endswith(".safetensors")


def test_a_cache_wait_given_up_is_busy_not_internal() -> None:
    from diffmorpher.cache import CacheWaitTimeout

    code, message = DiffMorpherHandler._classify(CacheWaitTimeout("gave up after waiting 3600 s for another worker's fit"))
    assert code == ErrorCode.BUSY and code.retryable and code.http_status == 503
    assert message.startswith("busy: gave up after waiting 3600 s")
