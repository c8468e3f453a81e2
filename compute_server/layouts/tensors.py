"""Tensors <-> record bytes: the few helpers every layout codec shares.

Unpacking runs per arriving record batch, so it only makes views over the received bytes; callers
copy each record once, into its destination.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Payload = tuple[str, int, memoryview]
"""(region, first record, bytes of whole records): one piece of a PutPrefix upload."""


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name of a torch dtype (``bfloat16``, ...); ValueError when unsupported."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (made contiguous), as a flat memoryview."""
    return t.contiguous().view(torch.uint8).numpy().data.cast("B")


def batches(region: str, record_size: int, data: memoryview, batch_bytes: int) -> Iterator[Payload]:
    """Cut a region's records into payloads of whole records, about ``batch_bytes`` each."""
    per_batch = max(1, batch_bytes // record_size)
    step = per_batch * record_size
    for offset in range(0, len(data), step):
        yield region, offset // record_size, data[offset : offset + step]


def frombuffer(payload: memoryview | bytes, dtype: torch.dtype) -> torch.Tensor:
    """A read-only tensor view over received bytes (never written: callers copy out of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read
        return torch.frombuffer(payload, dtype=dtype)
