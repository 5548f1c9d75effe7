"""Host/device traffic kept to a few copies: rows as slices, many small tensors in one copy.

Indexing a device tensor with a Python list builds the index on the host and copies it to the
device (a synchronisation from pageable memory, on every call). A batch's endpoint images are
contiguous (batching.sequence_batches cuts the K endpoints into consecutive chunks), so their
rows are a slice: a view, no copy, no index tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch


def row_index(indices: Sequence[int]) -> slice | list[int]:
    """A slice selecting `indices` where they are consecutive and ascending, else the list."""
    index = list(indices)
    if not index:
        return slice(0, 0)
    if index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return index


def move_together(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors on `device` in one copy (flattened into one buffer, split into views of their
    shapes after), not one copy each: a LoRA has a few hundred small tensors, and every copy
    between pageable host memory and a GPU waits for it. All must share one dtype."""
    if not tensors:
        return []
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors]).to(device)
    parts = torch.split(flat, [tensor.numel() for tensor in tensors])
    return [part.view(tensor.shape) for part, tensor in zip(parts, tensors)]
