"""Collecting a pass's decoded frames and reporting them in sequence order.

Batches finish out of sequence order (the endpoints ride in the first batch, the frames of all
segments are interleaved by alpha), and an endpoint frame is the decoded endpoint image. A
client that streams frames wants them in order, so a frame is reported once every frame before
it is in; the step events count the intermediate frames done, after each batch.
"""

from __future__ import annotations

import torch

from .batching import Batch, FrameSpec
from .preprocess import tensor_to_images
from .results import STAGE_FRAME_READY, ProgressCallback, ProgressEvent


class FrameCollector:
    """The frames of one pass, (N, 3, H, W) in [0, 1], filled batch by batch.

    `stream`: report each finished frame (STAGE_FRAME_READY, with its image) in order; the
    reschedule's measuring pass does not, its frames are not the result. `to_cpu`: the frames
    are the result's: each batch's decoded frames move to the CPU here, once, before they are
    reported or kept (the measuring pass keeps them on the run device, where LPIPS reads them).
    """

    def __init__(
        self, specs: list[FrameSpec], num_images: int, stage: str, progress: ProgressCallback | None, stream: bool,
        to_cpu: bool = False,
    ) -> None:
        self.specs = specs
        self.to_cpu = to_cpu
        self.num_images = num_images
        self.stage = stage
        self.progress = progress
        self.stream = stream
        self.endpoints: dict[int, torch.Tensor] = {}
        self.frames: dict[int, torch.Tensor] = {}
        self.intermediate_total = sum(spec.is_intermediate for spec in specs)
        self.done = 0
        self.next_index = 0  # the first frame not yet reported

    def add(self, batch: Batch, decoded: torch.Tensor) -> None:
        """The decoded rows of `batch` (endpoints first, as the batch holds them)."""
        if self.to_cpu:
            decoded = decoded.cpu()
        self.endpoints |= dict(zip(batch.images, decoded[: len(batch.images)]))
        for spec, frame in zip(batch.frames, decoded[len(batch.images):]):
            self.frames[spec.index] = frame
        if len(self.endpoints) == self.num_images:  # the endpoints are in, so are frames so far
            for spec in self.specs:
                if not spec.is_intermediate:
                    self.frames.setdefault(spec.index, self.endpoints[spec.endpoint])
            self._report_ready()
        self.done += len(batch.frames)
        if self.progress and batch.frames:
            self.progress(ProgressEvent(stage=self.stage, step=self.done, total=self.intermediate_total))

    def _report_ready(self) -> None:
        total = len(self.specs)
        while self.stream and self.progress and self.next_index in self.frames:
            frame = self.frames[self.next_index]
            self.progress(ProgressEvent(
                stage=STAGE_FRAME_READY, step=self.next_index + 1, total=total,
                frame=tensor_to_images(frame.unsqueeze(0))[0], frame_index=self.next_index, num_frames=total,
            ))
            self.next_index += 1

    def tensor(self) -> torch.Tensor:
        return torch.stack([self.frames[index] for index in sorted(self.frames)])
