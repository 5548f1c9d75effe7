"""TorchServe handler for the morph service: a thin adapter over the `diffmorpher` core.

It only decodes the request (morph_request), runs the core pipeline, encodes the response
(morph_protocol/wire.py framing, media from diffmorpher.encoding) and maps errors to status codes. TorchServe
has been in limited maintenance since 2025; keeping all logic in the core means replacing this
file is all it takes to move to another server.

Streaming: when the request's `stream` field is true the handler sends progress and every
finished frame as intermediate responses, then the result. The handler cannot see which RPC was
used (gRPC metadata does not reach the worker), and in TorchServe 0.12 intermediate responses on
a unary call kill the worker; so the guard's gateway (guard/gateway.py) sets the field on
StreamPredictions and refuses it on Predictions, and its watchdog replaces a worker killed by a
client that bypassed the gateway.

Open Inference Protocol: a KServe v2 ModelInfer call (through the gateway, served by TorchServe
with ts_open_inference_protocol=true) arrives as one JSON `body`; oip.py turns it into the native
fields, so the same parser checks it, and writes the answer as the JSON TorchServe turns into a
ModelInferResponse. ModelInfer is unary: it never gets intermediate responses.

Stopping: every request may carry a `deadline`, and the gateway marks cancelled calls in the
control directory (morph_protocol/control.py); request_stop.CallStop turns both into the core's StopCheck,
asked at every LoRA and denoising step and every LOCK_POLL_S while waiting for another worker's
fit of the same image (diffmorpher/cache.py), and writes this worker's heartbeat for the watchdog.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from morph_protocol import limits, wire
from morph_protocol.errors import ErrorCode, format_error
from diffmorpher.cache import CacheMiss, CacheStore, CacheWaitTimeout, DiskStore, TensorCache
from diffmorpher.cache_redis import RedisStore, RemoteStatus, TieredStore
from diffmorpher.compile import COMPILE_OFF, compile_unet_blocks
from diffmorpher.config import FIELD, ConfigError, MorphConfig
from diffmorpher.devices import device_for_worker, is_out_of_memory, release_cached_memory, use_device, worker_threads
from diffmorpher.encoding import encode_parts
from diffmorpher.interrupt import CANCELLED, MorphStopped
from diffmorpher.pipeline import DiffMorpherPipeline
from morph_protocol.control import ControlDir
from handler.morph_request import parse_request
from handler.morph_response import (
    ResponseTooLarge, StreamSender, check_size, endpoint_parts, lora_parts, result_metadata,
)
from handler.oip import CONTENT_TYPE as OIP_CONTENT_TYPE
from handler.oip import InferRequest, oip_message, parse_infer_request, response_body
from handler.request_stop import CallStop, WorkerHeartbeat, parse_call_control

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "DIFFMORPHER_CACHE_DIR"
CACHE_REDIS_ENV = "DIFFMORPHER_CACHE_REDIS_URL"


class DiffMorpherHandler:
    """`initialize` loads the pipeline once per worker; `handle` serves each batch of requests.

    Configured by the `handler:` section of the archive's model-config.yaml:
    `model_dir` (weights folder, relative to the extracted archive or absolute), `lpips_weights`,
    `defaults` (MorphConfig fields), `max_response_bytes`, `progress_interval_s`, `torch_threads`,
    `cache_dir` / `cache_max_bytes` (the LoRA/latent cache shared by the model's workers),
    `cache_redis_url` / `cache_redis_max_entry_bytes` (its tier shared by replicas), `compile`.
    Sizes and the progress interval not set there are morph_protocol.limits'.
    """

    def __init__(self) -> None:
        self.initialized = False
        self.pipeline: DiffMorpherPipeline | None = None
        self.defaults = MorphConfig()
        self.max_response_bytes = limits.MAX_RESPONSE_BYTES
        self.progress_interval_s = limits.PROGRESS_INTERVAL_S
        self.model_name = "diffmorpher"
        self.model_version = ""  # the archive's, for ModelInfer responses
        self.control = ControlDir.from_env()
        self.heartbeat = WorkerHeartbeat(self.control)
        # Shared cache tier counts already reported as metrics (the counters are cumulative).
        self._remote_seen = {"CacheRemoteErrors": 0, "CacheRemoteHits": 0}

    # ------------------------------------------------------------------ lifecycle
    def initialize(self, context: Any) -> None:
        # TorchServe's worker pre-decodes REST parts by content type (json.loads for
        # application/json: NaN, duplicate keys and megabytes of whitespace pass; text/* as
        # UTF-8) before the handler sees them, differently from gRPC. It reads this variable per
        # request: with it off, every transport reaches morph_request's one strict parser as bytes.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        properties = context.system_properties
        archive_dir = Path(properties.get("model_dir", "."))
        settings = dict((context.model_yaml_config or {}).get("handler", {}) or {})
        self.model_name = getattr(context, "model_name", None) or self.model_name
        manifest = getattr(context, "manifest", None) or {}
        self.model_version = str((manifest.get("model") or {}).get("modelVersion") or "")
        self.defaults = MorphConfig.from_dict(settings.get("defaults") or {})
        self.max_response_bytes = int(settings.get("max_response_bytes", limits.MAX_RESPONSE_BYTES))
        self.progress_interval_s = float(settings.get("progress_interval_s", limits.PROGRESS_INTERVAL_S))
        weights = _resolve(archive_dir, settings.get("model_dir", "model"))
        lpips = settings.get("lpips_weights")
        lpips_path = _resolve(archive_dir, lpips) if lpips else None
        if lpips_path is not None and not lpips_path.exists():
            logger.warning("lpips weights %s not found; the core falls back to its default", lpips_path)
            lpips_path = None
        yaml_config = context.model_yaml_config or {}
        workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
        threads = worker_threads(int(settings.get("torch_threads", 0) or 0), workers)
        if threads is not None:
            torch.set_num_threads(threads)
        device = device_for_worker(properties.get("gpu_id"))
        use_device(device)  # before loading: everything that takes the current device gets this worker's GPU
        cache = _cache(archive_dir, settings)
        logger.info("loading %s on %s (lpips: %s, cache: %s)", weights, device, lpips_path,
                    cache.store if cache else "off")
        self.pipeline = DiffMorpherPipeline.from_pretrained(
            weights, device=device, dtype=self.defaults.dtype, lpips_weights=lpips_path, cache=cache
        )
        metric = self.pipeline.perceptual
        if metric is not None and metric.name != "lpips-alex":  # never a silent swap: said here and in every result
            logger.warning(
                "LPIPS weights missing: morphs with use_reschedule measure frame distances with %s "
                "instead, and their results say perceptual_metric %r; ship the weights in the archive "
                "(python -m export.lpips_weights prepare, then build the archive)", metric.name, metric.name,
            )
        compile_backend = str(settings.get("compile", COMPILE_OFF) or COMPILE_OFF)
        if compile_backend != COMPILE_OFF:
            compiled = compile_unet_blocks(self.pipeline.models.unet, backend=compile_backend)
            logger.info("torch.compile (%s) of %d UNet blocks; the first morph compiles them", compile_backend, compiled)
        if cache is not None:  # hash the weights now, not in the first request
            logger.info("model identity for the cache: %s", self.pipeline.models.identity)
        if self.control is not None:
            self.control.prune_cancel_markers(older_than_s=24 * 3600)
        self.heartbeat.idle()
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[bytes]:
        """One response per request. With one request per batch (the shipped config), a
        failure raises PredictionException so TorchServe returns its code and message; in
        larger batches the failing request gets its own status and message."""
        from ts.utils.util import PredictionException

        responses: list[bytes] = []
        for index, request_data in enumerate(data):
            try:
                responses.append(self._serve_one(index, request_data, context))
            except Exception as error:  # noqa: BLE001 - the worker must survive any request
                code, message = self._classify(error)
                if code == ErrorCode.OUT_OF_MEMORY and self.pipeline is not None:
                    release_cached_memory(self.pipeline.models.device)
                self._count("MorphRejected", context, reason=code.value)
                tagged = format_error(code, message)
                if len(data) == 1:
                    raise PredictionException(tagged, code.http_status) from error
                context.set_response_status(code.http_status, tagged, index)
                responses.append(tagged.encode("utf-8"))
        return responses

    # ------------------------------------------------------------------ one request
    def _serve_one(self, index: int, request_data: Any, context: Any) -> bytes:
        """One request, stopped at its deadline or when the gateway marks it cancelled; the
        heartbeat says busy for its duration. A ModelInfer request is served as the native
        fields oip.py makes of it, its errors naming its tensors (from the error's `field`)."""
        infer = parse_infer_request(request_data)
        fields = request_data if infer is None else infer.fields
        call = parse_call_control(fields)
        self.heartbeat.busy(call.call_id)
        try:
            return self._morph_one(index, fields, context, CallStop(call, self.control, self.heartbeat), infer)
        except (ConfigError, CacheMiss) as error:
            if infer is None:
                raise
            raise type(error)(oip_message(error)) from error
        finally:
            self.heartbeat.idle()
            if call.call_id and self.control is not None:
                self.control.forget(call.call_id)

    def _morph_one(self, index: int, request_data: Any, context: Any, stop: CallStop,
                   infer: InferRequest | None = None) -> bytes:
        started = time.perf_counter()
        context.set_response_content_type(index, wire.CONTENT_TYPE if infer is None else OIP_CONTENT_TYPE)
        not_started = stop.check_before_start()
        if not_started is not None:
            raise MorphStopped(not_started, "queue")
        request = parse_request(request_data, self.defaults)
        decoded = time.perf_counter()
        self._count("MorphRequests", context, mode="oip" if infer else "stream" if request.stream else "unary")
        if self.pipeline is None:
            raise RuntimeError("the handler was not initialized")
        progress = None
        if request.stream and infer is None:  # ModelInfer is unary: no intermediate responses
            progress = StreamSender(
                self._intermediate_sender(index, context), self.max_response_bytes, self.progress_interval_s
            )
        images = [self._resolve(index, image) for index, image in enumerate(request.images)]
        # LoRAs sent instead of fitted, checked against this model (errors name lora_<i>)
        sent = [self.pipeline.read_lora(data, wire.lora_key(i)) if data is not None else None
                for i, data in enumerate(request.loras)]
        given = sent if any(lora is not None for lora in sent) else None
        result = self.pipeline(images, request.prompts, request.config, loras=given, progress=progress, stop=stop)
        generated = time.perf_counter()
        parts = [
            wire.Part(part.name, part.mime, part.data)
            for output in request.outputs
            for part in encode_parts(result.frames, output)
        ] + endpoint_parts(result)
        if request.config.return_loras:
            parts += lora_parts(result)
        finished = time.perf_counter()
        timings = {
            **{stage: round(float(t), 4) for stage, t in result.timings.items()},
            "decode_request": round(decoded - started, 4),
            "encode_output": round(finished - generated, 4),
            "total": round(finished - started, 4),
        }
        metadata = result_metadata(request, result, timings)
        remote = self._remote_cache_status()
        if remote is not None:  # the shared tier: "ok", or "down" (served from the local tier)
            metadata["cache_remote"] = remote.state
            for name, total in (("CacheRemoteErrors", remote.errors), ("CacheRemoteHits", remote.hits)):
                self._emit(context, name, total - self._remote_seen[name], "Count", {}, counter=True)
                self._remote_seen[name] = total
        if infer is None:
            payload = wire.encode_message(wire.TYPE_RESULT, metadata, parts)
        else:
            payload = response_body(infer, self.model_name, self.model_version, metadata, parts)
        check_size(payload, self.max_response_bytes, "the result")
        self._observe(context, timings, len(result.frames))
        return payload

    def _resolve(self, index: int, image: Any) -> Any:
        """An image, or the stored one an image reference names; errors name the field."""
        if not isinstance(image, wire.ImageRef):
            return image
        try:
            return self.pipeline.stored_image(image.key)
        except (ConfigError, CacheMiss) as error:
            raise type(error)(f"{FIELD}: {error}", field=wire.image_ref_key(index)) from error

    def _remote_cache_status(self) -> RemoteStatus | None:
        cache = self.pipeline.cache if self.pipeline is not None else None
        return getattr(cache.store, "status", None) if cache is not None else None

    @staticmethod
    def _intermediate_sender(index: int, context: Any):
        """Sends one payload as an intermediate response of request `index` of the batch."""
        from ts.handler_utils.utils import send_intermediate_predict_response

        request_id = context.request_ids[index]

        def send(payload: bytes) -> None:
            send_intermediate_predict_response(
                {index: payload}, {index: request_id}, "Intermediate response", 200, context
            )

        return send

    @staticmethod
    def _classify(error: Exception) -> tuple[ErrorCode, str]:
        """The error's code and a readable message. The code's HTTP status goes to TorchServe
        (errors.ErrorCode's table: what TorchServe and the gateway make of it); the code itself
        travels as the message's tag (errors.format_error), since TorchServe answers several
        statuses with one gRPC code (507 and 500 are both INTERNAL)."""
        if isinstance(error, ConfigError):
            return ErrorCode.INVALID_REQUEST, f"invalid request: {error}"
        if isinstance(error, CacheMiss):
            return ErrorCode.NOT_FOUND, f"not found: {error}"
        if isinstance(error, ResponseTooLarge):
            return ErrorCode.TOO_LARGE, str(error)
        if isinstance(error, CacheWaitTimeout):  # another worker's fit of the same image outlasted the last-resort wait
            logger.warning("cache wait given up: %s", error)
            return ErrorCode.BUSY, f"busy: {error}"
        if isinstance(error, MorphStopped):
            logger.info("morph stopped: %s", error)
            return (ErrorCode.CANCELLED if error.reason.kind == CANCELLED else ErrorCode.DEADLINE_EXCEEDED), str(error)
        if is_out_of_memory(error):
            logger.warning("morph ran out of memory: %s", error)
            return ErrorCode.OUT_OF_MEMORY, (
                f"out of memory: the server ran out of memory for this morph "
                f"({type(error).__name__}, after halving the frame batches down to one row); ask for "
                f"a smaller frame_batch_size (it also bounds how many images one LoRA fit holds), a "
                f"smaller vae_batch_size, fewer images or a lower resolution"
            )
        logger.exception("morph failed")
        return ErrorCode.INTERNAL, f"morph failed: {type(error).__name__}: {error}"

    # ------------------------------------------------------------------ metrics
    def _count(self, name: str, context: Any, **dimensions: str) -> None:
        self._emit(context, name, 1, "Count", dimensions, counter=True)

    def _observe(self, context: Any, timings: dict[str, float], frames: int) -> None:
        self._emit(context, "MorphLatencySeconds", timings["total"], "Seconds", {}, counter=False)
        for stage, seconds in timings.items():
            if stage != "total":
                self._emit(context, "MorphStageSeconds", seconds, "Seconds", {"stage": stage}, counter=False)
        self._emit(context, "MorphFrames", frames, "Count", {}, counter=True)

    def _emit(self, context: Any, name: str, value: float, unit: str,
              dimensions: dict[str, str], *, counter: bool) -> None:
        """Metrics never fail a request: a metrics problem is logged and skipped."""
        if getattr(context, "metrics", None) is None:  # e.g. a handler driven outside TorchServe
            return
        try:
            from ts.metrics.dimension import Dimension
            from ts.metrics.metric_type_enum import MetricTypes

            metric_type = MetricTypes.COUNTER if counter else MetricTypes.GAUGE
            dims = [Dimension(key.capitalize(), value_) for key, value_ in dimensions.items()]
            context.metrics.add_metric(name, value, unit, dimensions=dims, metric_type=metric_type)
        except Exception:  # noqa: BLE001
            logger.warning("could not emit metric %s", name, exc_info=True)


def _cache(archive_dir: Path, settings: dict[str, Any]) -> TensorCache | None:
    """The LoRA/latent cache from `handler.cache_dir` (relative to the unpacked archive, which
    every worker of the model shares; "off" disables it) or $DIFFMORPHER_CACHE_DIR, capped at
    `handler.cache_max_bytes`; with `handler.cache_redis_url` (or $DIFFMORPHER_CACHE_REDIS_URL)
    a Redis tier shared by replicas behind it (cache_redis.py)."""
    location = os.environ.get(CACHE_DIR_ENV) or str(settings.get("cache_dir", "cache") or "off")
    if location == "off":
        return None
    max_bytes = int(settings.get("cache_max_bytes", limits.CACHE_MAX_BYTES))
    store: CacheStore = DiskStore(_resolve(archive_dir, location), max_bytes=max_bytes)
    redis_url = os.environ.get(CACHE_REDIS_ENV) or str(settings.get("cache_redis_url", "") or "")
    if redis_url:
        max_entry = int(settings.get("cache_redis_max_entry_bytes", limits.CACHE_REDIS_MAX_ENTRY_BYTES))
        store = TieredStore(store, RedisStore(redis_url, max_entry_bytes=max_entry))
    return TensorCache(store)


def _resolve(base: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base / path

