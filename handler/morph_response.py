"""Building the morph service's responses (no framework import): result metadata, size limits,
and the stream of progress/frame messages sent while a morph runs."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from morph_protocol import wire
from diffmorpher.encoding import MIME_PNG, encode_png, frame_name
from diffmorpher.lora_file import lora_to_safetensors
from diffmorpher.results import MorphResult, ProgressEvent
from handler.morph_request import MorphRequest


class ResponseTooLarge(Exception):
    """An encoded message would exceed the server's max_response_size."""


def check_size(payload: bytes, limit: int, what: str) -> None:
    """Refuse a message the server's frontend would refuse (killing the worker's connection)."""
    if len(payload) > limit:
        raise ResponseTooLarge(
            f"{what} is {len(payload) / 2**20:.1f} MiB, over the server's response limit of "
            f"{limit / 2**20:.1f} MiB; ask for fewer frames, a lower resolution, or format mp4"
        )


def result_metadata(request: MorphRequest, result: MorphResult, timings: dict[str, float]) -> dict[str, Any]:
    """What the final message's header says about the morph."""
    return {
        "num_frames": len(result.frames),
        "alphas": [float(a) for a in result.alphas],
        "segments": [int(s) for s in result.segments],
        "timings": timings,
        "seed": int(result.seed),
        "perceptual_metric": result.perceptual_metric,
        "perceptual_weights": str(result.perceptual_weights),
        "resolution": int(result.resolution),
        "formats": request.formats,
        "frame_duration_ms": request.outputs[0].frame_duration_ms,
        "loop": request.outputs[0].loop,
        "webp_quality": request.outputs[0].webp_quality,  # read by a webp output only (lossy)
        "webp_lossless": request.outputs[0].webp_lossless,
        "config": request.config.to_dict(),  # as requested (0 / "auto" where the worker chooses)
        "device": result.device,  # what the worker chose: its device and dtype,
        "dtype": result.dtype,
        "frame_batch_size": result.frame_batch_size,  # and the rows per UNet call for this morph
        "cache": result.cache,  # per input image: lora/latent "hit" | "miss" | "off", lora_key, image_key
        "schedule_cache": result.schedule_cache,  # the reschedule's alphas: "hit" | "miss" | "off"
        # the result's LoRA parts (return_loras), by image: diffusers LoRA files
        "lora_parts": [wire.lora_part_name(index) for index, lora in enumerate(result.loras) if lora is not None]
        if request.config.return_loras else [],
        "work": result.work.to_dict(),  # LoRA fits/steps and inversions this morph ran (the cache's proof)
        # One image, K prompts: per endpoint the server made, its prompt index, part and cache state.
        "endpoints": [
            {"index": index, "part": wire.endpoint_part_name(index), "cache": state}
            for index, state in enumerate(result.endpoint_cache, start=1)
        ],
        "worker_pid": os.getpid(),  # which worker served it (logs, cache sharing)
    }


def endpoint_parts(result: MorphResult) -> list[wire.Part]:
    """The endpoints the server made for prompts 1..K-1 of a one-image morph, as PNG parts
    (wire.MIME_ENDPOINT); none for a morph of uploaded images."""
    return [
        wire.Part(wire.endpoint_part_name(index), wire.MIME_ENDPOINT, encode_png(image))
        for index, image in enumerate(result.generated, start=1)
    ]


def lora_parts(result: MorphResult) -> list[wire.Part]:
    """The morph's LoRAs (fitted, cached or sent), one diffusers LoRA file per endpoint (each
    image, made ones of a one-image morph too: `lora_<i>.safetensors`); none in no-LoRA mode."""
    return [
        wire.Part(wire.lora_part_name(index), wire.MIME_SAFETENSORS, lora_to_safetensors(lora))
        for index, lora in enumerate(result.loras) if lora is not None
    ]


class StreamSender:
    """A pipeline progress callback that sends every finished frame (PNG) and throttled
    progress (first and last step of each stage always, else at most one per `interval_s`)."""

    def __init__(self, send: Callable[[bytes], None], max_bytes: int, interval_s: float) -> None:
        self.send = send
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.last_sent: dict[str, float] = {}
        self.sent = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.frame is not None:
            index = event.frame_index or 0
            header = {"index": index, "num_frames": event.num_frames, "stage": event.stage}
            part = wire.Part(frame_name(index, event.num_frames or 0), MIME_PNG, encode_png(event.frame))
            self._send(wire.encode_message(wire.TYPE_FRAME, header, [part]), "a streamed frame")
            return
        key = f"{event.stage}:{event.item}"
        now = time.monotonic()
        is_edge = event.step <= 1 or event.step >= event.total
        if not is_edge and now - self.last_sent.get(key, float("-inf")) < self.interval_s:
            return
        self.last_sent[key] = now
        header = {"stage": event.stage, "step": event.step, "total": event.total, "item": event.item}
        self._send(wire.encode_message(wire.TYPE_PROGRESS, header), "a progress message")

    def _send(self, payload: bytes, what: str) -> None:
        check_size(payload, self.max_bytes, what)
        self.send(payload)
        self.sent += 1
