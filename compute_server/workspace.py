"""Scratch tensors reused across calls by one thread (pure torch, no I/O).

On a CPU a tensor of a prefix's size allocated fresh per layer is served by ``mmap`` (glibc serves
blocks over its threshold that way) and costs a page fault per 4 KiB on first touch, every time:
measured on the 2-core machine, a fresh float32 ``[4, 16384, 128]`` tensor cost more to fault in
than the 2-bit key decoding that filled it (90 ms against 9 ms). A request keeps one
:class:`Workspace` per role and reuses its storage from layer to layer.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named scratch tensors for one thread (a request's policy, or its layer loop); see the module
    docstring. A tensor it returned is valid until the next :meth:`get` of the same name."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined), reusing ``name``'s storage when big enough."""
        size = math.prod(shape)
        held = self._buffers.get(name)
        if held is None or held.numel() < size or held.device != device or held.dtype != dtype:
            held = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return held[:size].view(shape)
