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


def _spend_the_read_only_warning() -> None:
    """torch warns once per process that a tensor over a read-only buffer could be written through
    ("The given buffer is not writable"); views over received bytes are read-only and only read.
    The warning is spent here, silenced, when the module is imported (one thread, under the import
    lock), so that :func:`frombuffer` needs no ``warnings.catch_warnings`` per call: that cost
    2.7 µs a record (its own and the 1.2 µs view's total was 3.8), and it swaps the process's
    warning filters, which is not thread-safe while request threads and the event loop decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0\0\0\0", dtype=torch.uint8)


_spend_the_read_only_warning()


def frombuffer(payload: memoryview | bytes, dtype: torch.dtype) -> torch.Tensor:
    """A read-only tensor view over received bytes (never written: callers copy out of it)."""
    return torch.frombuffer(payload, dtype=dtype)
