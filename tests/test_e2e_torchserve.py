"""End to end: `python -m export` -> .mar -> a real TorchServe (Java frontend + Python worker) on
loopback ports -> gRPC (unary and streaming) and REST, with token authorization on.

One server for the module (startup takes tens of seconds). Morphs are kept tiny (4 frames, 3
LoRA steps, 8 DDIM steps) so the module runs in a few minutes on 2 CPU cores. The archive holds
the embedded model when it is present (models/tiny-shapes-sd), else the tiny random SD folder,
on which the "endpoints resemble the inputs" check is skipped (its outputs are noise).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from morph_protocol import wire
from morph_protocol.errors import ErrorCode
from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient, MorphClientError
from client.rest import RestClient
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT, demo_inputs, served_model
from launcher.torchserve import TorchServeProcess

pytestmark = pytest.mark.slow

FRAMES = 4
TINY = {"num_frames": FRAMES, "lora_steps": 3, "num_inference_steps": 8, "use_reschedule": False, "seed": 7}
HAS_EMBEDDED = (EMBEDDED_MODEL / "unet").is_dir()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    with TorchServeProcess(tmp_path_factory.mktemp("torchserve") / "server", model_store) as process:
        yield process


@pytest.fixture()
def client(server: TorchServeProcess):
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=1) as morph:
        yield morph


def frames_of_gif(data: bytes) -> list[np.ndarray]:
    gif = Image.open(io.BytesIO(data))
    frames = []
    for index in range(gif.n_frames):
        gif.seek(index)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.float32))
    return frames


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


# ---------------------------------------------------------------------------- unary gRPC
@pytest.fixture(scope="module")
def unary_result(server: TorchServeProcess):
    """One unary morph (GIF + PNG frames, and its fitted LoRAs) shared by the checks below;
    records the worker pid."""
    images, prompts = demo_inputs()
    pid_before = server.worker_pid()
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file)) as morph:
        result = morph.morph(images, prompts, {**TINY, "format": ["gif", "png"], "return_loras": True}, deadline_s=600)
    return result, pid_before


def test_unary_returns_gif_with_requested_frames(unary_result) -> None:
    result, _ = unary_result
    frames = frames_of_gif(result.part_for("gif").data)
    assert len(frames) == FRAMES
    assert result.metadata["num_frames"] == FRAMES
    assert result.metadata["alphas"][0] == 0.0 and result.metadata["alphas"][-1] == 1.0
    assert len(result.metadata["alphas"]) == FRAMES
    assert result.metadata["seed"] == TINY["seed"]
    # The CPU worker's own choices, where the request said auto (0 / "auto").
    assert (result.metadata["device"], result.metadata["dtype"], result.metadata["frame_batch_size"]) == ("cpu", "float32", 16)
    assert {"lora", "inversion", "frames", "encode_output", "total"} <= set(result.metadata["timings"])
    assert "perceptual_metric" in result.metadata
    assert [p.name for p in result.parts if p.mime == "image/png"] == [f"frame_{i:03d}.png" for i in range(FRAMES)]


def test_unary_call_leaves_the_worker_serving(server: TorchServeProcess, client: MorphClient, unary_result) -> None:
    """The TorchServe 0.12 trap: streaming into a unary call kills the worker while the
    management API still says READY (and keeps its pid). So liveness is proven by a following
    request that completes on the same worker process."""
    _, pid_before = unary_result
    images, prompts = demo_inputs()
    quick = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}
    assert client.morph(images, prompts, quick, deadline_s=120).metadata["num_frames"] == 2
    assert server.worker_pid() == pid_before


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


@pytest.mark.skipif(not HAS_EMBEDDED, reason="the random tiny model's frames are noise")
def test_endpoint_frames_resemble_inputs(unary_result) -> None:
    """The first frame is image A and the last image B, by PSNR with a tight bound, and far from
    the other image; the frames walk from A to B (distance to A rising, to B falling). Measured
    on the demo pair at these options (4 frames, 3 LoRA steps, 8 DDIM steps, 64 px): first frame
    23.5 dB to A and 7.5 dB to B, last 22.5 dB to B and 7.4 dB to A; mean abs distance to A 14,
    28, 50, 65 and to B 66, 51, 21, 13 (of 255). The two images are 7.8 dB apart, so a flat
    colour of the right hue, or the other image, scores about 8 dB."""
    result, _ = unary_result
    pngs = [p.data for p in result.parts if p.mime == "image/png"]
    frames = [png_array(data) for data in pngs]
    images, _ = demo_inputs()
    size = Image.open(io.BytesIO(pngs[0])).size
    a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB").resize(size), dtype=np.float32) for x in images)
    to_a = [psnr_db(frame, a) for frame in frames]
    to_b = [psnr_db(frame, b) for frame in frames]
    print(f"\nPSNR to A {[round(x, 2) for x in to_a]} dB, to B {[round(x, 2) for x in to_b]} dB")
    assert to_a[0] >= 20.0 and to_b[-1] >= 20.0, (to_a, to_b)  # 3 dB under the measured 23.5 / 22.5
    assert to_a[0] - to_b[0] >= 10.0 and to_b[-1] - to_a[-1] >= 10.0, (to_a, to_b)  # measured 16 and 15
    distance_a = [float(np.abs(frame - a).mean()) for frame in frames]
    distance_b = [float(np.abs(frame - b).mean()) for frame in frames]
    assert all(x < y for x, y in zip(distance_a, distance_a[1:])), distance_a  # away from A, frame by frame
    assert all(x > y for x, y in zip(distance_b, distance_b[1:])), distance_b  # and towards B
    assert max(to_a[1:-1] + to_b[1:-1]) < 18.0, (to_a, to_b)  # the frames between are neither input


# ---------------------------------------------------------------------------- the CLI
def test_cli_out_webp_by_suffix_gives_an_animated_webp_with_every_frame(server: TorchServeProcess, unary_result,
                                                                        tmp_path: Path) -> None:
    """`python -m client morph ... --out x.webp` against the served model (as after `make
    serve`): the suffix asks for WebP, and the file is an animated WebP holding every frame at
    the morph's size, lossy at the server's default quality, close to the PNG frames of the same
    morph (the unary result's: same options and seed, its LoRAs now cached). Measured on the
    demo pair: 4 frames of 64 px, 2082 bytes (the GIF 17130), 34.1-35.9 dB PSNR to the PNGs."""
    images, prompts = demo_inputs()
    paths = [tmp_path / f"image_{i}.png" for i in range(2)]
    for path, data in zip(paths, images):
        path.write_bytes(data)
    out = tmp_path / "out" / "x.webp"
    command = [
        sys.executable, "-m", "client", "--target", server.grpc_target, "--key-file", str(server.key_file),
        "morph", *map(str, paths), "--prompt-a", prompts[0], "--prompt-b", prompts[1],
        "--frames", str(FRAMES), "--seed", str(TINY["seed"]), "--option", f"lora_steps={TINY['lora_steps']}",
        "--option", f"num_inference_steps={TINY['num_inference_steps']}", "--option", "use_reschedule=false",
        "--out", str(out), "--metadata-out", str(tmp_path / "metadata.json"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"wrote {out}" in done.stdout
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["formats"] == ["webp"] and metadata["webp_lossless"] is False and metadata["webp_quality"] == 80
    result, _ = unary_result
    pngs = [png_array(p.data) for p in result.parts if p.mime == "image/png"]
    webp = Image.open(out)
    assert webp.format == "WEBP" and webp.is_animated and webp.n_frames == FRAMES
    frames = []
    for index in range(webp.n_frames):
        webp.seek(index)
        frames.append(np.asarray(webp.convert("RGB"), dtype=np.float32))
    assert all(frame.shape == pngs[0].shape for frame in frames)
    to_png = [psnr_db(frame, png) for frame, png in zip(frames, pngs)]
    gif_bytes = len(result.part_for("gif").data)
    print(f"\nCLI --out x.webp: {FRAMES} frames, {out.stat().st_size} bytes (GIF {gif_bytes}), "
          f"PSNR to the PNG frames {[round(x, 2) for x in to_png]} dB")
    assert 30.0 < min(to_png) and max(to_png) < 50.0, to_png  # lossy: close, not exact
    assert out.stat().st_size < gif_bytes


def test_returned_loras_load_with_diffusers_and_sent_back_give_the_same_frames(
    request: pytest.FixtureRequest, client: MorphClient, unary_result, tmp_path: Path
) -> None:
    """The fitted LoRAs the unary morph returned (return_loras) are diffusers LoRA files of the
    served model, and sent back (lora_<i>) they replace the fits: no LoRA step runs and the
    frames are the same PNG bytes."""
    import safetensors.torch
    import torch
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    result, _ = unary_result
    written = result.save_loras(tmp_path)
    assert [path.name for path in written] == ["lora_0.safetensors", "lora_1.safetensors"]
    assert result.metadata["lora_parts"] == [path.name for path in written]
    assert result.metadata["work"]["lora_fits"] == 2
    sd = StableDiffusionPipeline.from_pretrained(served_model(request))
    sd.load_lora_weights(str(tmp_path), weight_name="lora_0.safetensors", adapter_name="image_0")
    config = sd.unet.peft_config["image_0"]
    assert (config.r, config.lora_alpha) == (16, 16)
    loaded = get_peft_model_state_dict(sd.unet, adapter_name="image_0")
    in_file = safetensors.torch.load(written[0].read_bytes())
    assert len(loaded) == len(in_file) > 0
    assert all(torch.equal(tensor, in_file[f"unet.{key}"]) for key, tensor in loaded.items())
    images, prompts = demo_inputs()
    again = client.morph(images, prompts, {**TINY, "format": "png"}, deadline_s=600,
                         loras=[path.read_bytes() for path in written])
    assert again.metadata["work"] == {"lora_fits": 0, "lora_steps": 0, "inversions": 2}
    assert [p.data for p in again.parts] == [p.data for p in result.parts if p.mime == "image/png"]


# ---------------------------------------------------------------------------- REST
def test_rest_returns_the_same_result_for_the_same_seed(server: TorchServeProcess, unary_result) -> None:
    grpc_result, _ = unary_result
    images, prompts = demo_inputs()
    fields = {wire.image_key(i): data for i, data in enumerate(images)}
    fields |= {wire.prompt_key(i): p.encode() for i, p in enumerate(prompts)}
    fields[wire.INPUT_OPTIONS] = json.dumps({**TINY, "format": ["gif", "png"]}).encode()
    status, body, content_type = rest_predict(server, fields, token=server.key())
    assert status == 200, body[:500]
    assert content_type == wire.CONTENT_TYPE
    message = wire.decode_message(body)
    assert message.type == wire.TYPE_RESULT
    rest_frames = [png_array(p.data) for p in message.parts if p.mime == "image/png"]
    grpc_frames = [png_array(p.data) for p in grpc_result.parts if p.mime == "image/png"]
    assert len(rest_frames) == len(grpc_frames) == FRAMES
    for rest_frame, grpc_frame in zip(rest_frames, grpc_frames):
        assert np.abs(rest_frame - grpc_frame).max() <= 2.0  # same seed: same frames
    assert message.header["alphas"] == grpc_result.metadata["alphas"]


def rest_predict(server: TorchServeProcess, fields: dict[str, bytes], token: str | None) -> tuple[int, bytes, str]:
    answer = RestClient(server.url("inference", ""), server.model_name).post_fields(fields, token=token, timeout_s=600)
    return answer.status, answer.body, answer.content_type


# ---------------------------------------------------------------------------- streaming
def test_stream_sends_progress_then_every_frame_in_order_then_the_result(client: MorphClient) -> None:
    images, prompts = demo_inputs()
    events: list[wire.Message] = []
    # A seed no other test uses: the LoRAs are fitted (not cache hits), so every stage reports.
    result = client.morph_stream(images, prompts, {**TINY, "seed": 11, "format": ["gif", "png"]},
                                 deadline_s=600, on_event=events.append)
    kinds = [e.type for e in events]
    assert kinds[-1] == wire.TYPE_RESULT
    assert kinds[0] == wire.TYPE_PROGRESS
    stages = {e.header["stage"] for e in events if e.type == wire.TYPE_PROGRESS}
    assert {"lora", "inversion", "frames"} <= stages
    frame_indexes = [e.header["index"] for e in events if e.type == wire.TYPE_FRAME]
    assert frame_indexes == list(range(FRAMES))
    assert len(result.streamed_frames) == FRAMES
    final_pngs = [p.data for p in result.parts if p.mime == "image/png"]
    for streamed, final in zip(result.streamed_frames, final_pngs):
        assert np.array_equal(png_array(streamed), png_array(final))
    assert len(frames_of_gif(result.part_for("gif").data)) == FRAMES


# ---------------------------------------------------------------------------- errors and auth
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("non_image", "not a readable image"),
        ("missing_prompt", "missing prompt 'prompt_1'"),
        ("zero_frames", "num_frames must be between 2"),
        ("bad_lora", "field 'lora_0' is not a safetensors file"),
    ],
)
def test_bad_requests_get_a_client_error(server: TorchServeProcess, client: MorphClient, change: str, expected: str) -> None:
    images, prompts = demo_inputs()
    options = dict(TINY)
    if change == "non_image":
        images = [b"this is not an image", images[1]]
    elif change == "missing_prompt":
        prompts = prompts[:1]
    elif change == "zero_frames":
        options["num_frames"] = 0
    pid = server.worker_pid()
    fields = {wire.image_key(i): d for i, d in enumerate(images)}
    fields |= {wire.prompt_key(i): p.encode() for i, p in enumerate(prompts)}
    fields[wire.INPUT_OPTIONS] = json.dumps(options).encode()
    if change == "bad_lora":
        fields[wire.lora_key(0)] = b"PK\x03\x04 a zip, not a LoRA"
    with pytest.raises(MorphClientError) as raised:
        client.predict(fields, deadline_s=120)  # no client-side checks: the server must catch these
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.error_code == ErrorCode.INVALID_REQUEST  # the gateway's trailing metadata
    assert expected in raised.value.details and "diffmorpher:" not in raised.value.details
    assert server.worker_status() == "READY" and server.worker_pid() == pid


def test_worker_serves_a_good_request_after_bad_ones(server: TorchServeProcess, client: MorphClient) -> None:
    images, prompts = demo_inputs()
    with pytest.raises(MorphClientError) as raised:
        client.morph([b"garbage", images[1]], prompts, TINY, deadline_s=120)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # TorchServe itself, past the gateway: the code comes from the worker's tag in the message.
    with MorphClient(server.direct_grpc_target, tokens=TokenSource(token=server.key())) as direct:
        with pytest.raises(MorphClientError) as raised:
            direct.morph([b"garbage", images[1]], prompts, TINY, deadline_s=120)
    assert (raised.value.code, raised.value.error_code) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST)
    assert raised.value.details.startswith("invalid request: field 'image_0' is not a readable image")
    quick = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}
    result = client.morph(images, prompts, quick, deadline_s=300)
    assert result.metadata["num_frames"] == 2


def test_requests_without_a_valid_token_are_rejected(server: TorchServeProcess) -> None:
    images, prompts = demo_inputs()
    for tokens in (TokenSource(enabled=False), TokenSource(token="not-the-key")):
        with MorphClient(server.grpc_target, tokens=tokens, retries=0) as anonymous:
            with pytest.raises(MorphClientError) as raised:
                anonymous.morph(images, prompts, TINY, deadline_s=60)
            assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    fields = {wire.image_key(i): d for i, d in enumerate(images)}
    status, body, _ = rest_predict(server, fields, token=None)
    assert status in (400, 401, 403) and b"Token Authorization failed" in body


def test_client_rereads_an_expired_key_once(server: TorchServeProcess, tmp_path: Path) -> None:
    """A key file whose key changed after the client cached it (TorchServe rotates expired
    keys): the first call is denied, the client re-reads the file and succeeds."""
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "expired-key"}}))
    tokens = TokenSource(key_file=key_file)
    assert tokens.get() == "expired-key"
    key_file.write_text(server.key_file.read_text())
    with MorphClient(server.grpc_target, tokens=tokens, retries=0) as morph:
        assert "Healthy" in morph.ping()
    assert tokens.get() == server.key()


def metric_values(server: TorchServeProcess, name: str) -> dict[str, float]:
    """Prometheus samples of `name`: label text -> value (TorchServe declares every metric at
    start, so only recorded values prove anything)."""
    with urllib.request.urlopen(server.url("metrics", "/metrics"), timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            samples[labels[len(name):]] = float(value)
    return samples


def test_prometheus_metrics_record_requests_and_stage_times(server: TorchServeProcess, client: MorphClient,
                                                            unary_result) -> None:
    images, prompts = demo_inputs()
    before = sum(metric_values(server, "MorphRequests").values())
    for _ in range(2):
        client.morph(images, prompts, {**TINY, "num_frames": 2}, deadline_s=120)
    with pytest.raises(MorphClientError):
        client.morph([b"garbage", images[1]], prompts, TINY, deadline_s=60)
    requests = sum(metric_values(server, "MorphRequests").values())
    assert requests - before == 2  # counted once per decoded request
    rejected = metric_values(server, "MorphRejected")
    assert any('invalid_request' in labels and value >= 1 for labels, value in rejected.items()), rejected
    stages = metric_values(server, "MorphStageSeconds")
    lora = [value for labels, value in stages.items() if 'lora' in labels]
    assert lora and all(value > 0 for value in lora), stages
    assert all(value > 0 for value in metric_values(server, "MorphLatencySeconds").values())


def test_model_registration_over_the_api_is_off(server: TorchServeProcess) -> None:
    request = urllib.request.Request(
        server.url("management", "/models?url=https://example.invalid/evil.mar"),
        method="POST", headers={"Authorization": f"Bearer {server.key('management')}"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code in (400, 403, 405)
    assert server.worker_status() == "READY"


# ---------------------------------------------------------------------------- shared LoRA (issue 26)
def test_cli_morphs_three_images_with_one_shared_lora(server: TorchServeProcess, tmp_path: Path) -> None:
    """`python -m client morph a b c --option shared_lora=true` through the served model: one
    LoRA fitted (the metadata's work counts), every frame of the two segments returned."""
    import subprocess
    import sys

    from PIL import ImageChops

    from tests.conftest import REPO_ROOT

    images, prompts = demo_inputs()
    paths = []
    for index, data in enumerate([*images, images[0]]):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if index == 2:  # the first subject again, moved: a third pose
            image = ImageChops.offset(image, image.width // 6, image.height // 8)
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    out, meta = tmp_path / "morph.gif", tmp_path / "meta.json"
    options = [f"{key}={json.dumps(value)}" for key, value in TINY.items() if key != "num_frames"]
    command = [
        sys.executable, "-m", "client", "--target", server.grpc_target, "--key-file", str(server.key_file),
        "morph", *map(str, paths), "--prompt", prompts[0], "--prompt", prompts[1], "--prompt", prompts[0],
        "--frames", str(FRAMES), "--option", "shared_lora=true", *(f"--option={o}" for o in options),
        "--out", str(out), "--metadata-out", str(meta),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = json.loads(meta.read_text())
    assert metadata["config"]["shared_lora"] is True
    assert metadata["work"] == {"lora_fits": 1, "lora_steps": TINY["lora_steps"], "inversions": 3}
    assert len({entry["lora_key"] for entry in metadata["cache"]}) == 1  # one key for the whole set
    assert len(frames_of_gif(out.read_bytes())) == metadata["num_frames"] == 2 * (FRAMES - 1) + 1


# ---------------------------------------------------------------------------- one image, two prompts
@pytest.mark.skipif(not HAS_EMBEDDED, reason="the red-to-blue check needs the embedded model")
def test_one_image_and_two_prompts_through_the_cli_end_on_a_blue_circle(
    server: TorchServeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's acceptance through `python -m client`: `morph red_circle.png --prompt P1
    --prompt P2` succeeds; the last frame and the endpoint the server made (saved beside the
    GIF) are bluer than red inside the circle."""
    from client.__main__ import main
    from tests.conftest import DEMO_DIR
    from tests.test_endpoints import RED_TO_BLUE, inside_shape

    out = tmp_path / "morph.gif"
    options = {"lora_steps": 20, "num_inference_steps": 15, "use_reschedule": False}
    code = main(["--target", server.grpc_target, "--key-file", str(server.key_file), "morph",
                 str(DEMO_DIR / "red_circle.png"), "--prompt", RED_TO_BLUE[0], "--prompt", RED_TO_BLUE[1],
                 "--frames", "4", "--seed", "3", "--out", str(out),
                 *(f"--option={key}={json.dumps(value)}" for key, value in options.items())])
    assert code == 0, capsys.readouterr()
    last = Image.fromarray(frames_of_gif(out.read_bytes())[-1].astype(np.uint8))
    made = Image.open(tmp_path / "morph.endpoint_1.png").convert("RGB")
    for image in (last, made):
        inside = np.asarray(image, dtype=np.float64)[inside_shape(image)]
        assert inside[:, 2].mean() > inside[:, 0].mean() + 60, (inside[:, 0].mean(), inside[:, 2].mean())
