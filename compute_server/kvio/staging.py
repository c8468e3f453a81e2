"""Staging to the device: the one path by which tensors made from wire bytes reach the compute device.

Every tensor decoded from received records (K/V records, identification keys, digests, importance
statistics, token importance, probe keys) and every small host tensor a policy hands to device
math goes through here: on CUDA it is copied from pinned host memory on a side stream, with an
event the compute stream waits on; on the CPU it is used as it is.

- :func:`to_device` + :func:`wait_copy`: a layer's gathered K and V (``LayoutCodec.gather`` fills
  pinned host memory when the device is CUDA), copied on the stager thread when the layer's unit
  set was announced ahead; the compute thread waits on the event when it picks the layer up.
- :func:`to_device_now`: one tensor, for use right away on the calling thread's current stream
  (codec decode methods with a ``device``, policies' host-made tensors).
"""

from __future__ import annotations

import torch


def to_device(keys: torch.Tensor, values: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Copy pinned K/V to the device on a side stream; returns them and the event marking the copy done.

    The pinned sources must stay referenced until the copy is done (the loader keeps them until the
    request ends)."""
    (k, v), event = _side_copy((keys, values), device)
    return k, v, event


def _side_copy(sources: tuple[torch.Tensor, ...], device: torch.device) -> tuple[list[torch.Tensor], object]:
    """Copy pinned ``sources`` to ``device`` on a fresh side stream; the copies and the done event.

    The device copies are allocated on the side stream; ``record_stream`` tells the caching
    allocator they are also used on the (calling thread's) compute stream, so their memory is not
    handed out again before the compute stream's work on them has finished."""
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        out = [t.to(device, non_blocking=True) for t in sources]
        event = torch.cuda.Event()
        event.record(side)
    compute = torch.cuda.current_stream(device)
    for t in out:
        t.record_stream(compute)
    return out, event


def wait_copy(event: object, device: torch.device) -> None:
    """Make the compute stream wait for a :func:`to_device` copy (no-op without one)."""
    if isinstance(event, torch.cuda.Event):
        torch.cuda.current_stream(device).wait_event(event)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An empty host tensor to decode into: pinned when ``device`` is CUDA (so :func:`to_device_now`
    copies it without another host copy), ordinary memory otherwise."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def to_device_now(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` on ``device``, usable at once on the calling thread's current stream.

    On the CPU (``host`` already there) it returns ``host`` itself: no copy. On CUDA, ``host``
    (copied into a pinned buffer first unless it is pinned already) is copied on a side stream and
    the current stream waits on the copy's event, so later work on the current stream sees the
    data while the calling thread does not block. A tensor already on ``device`` is returned as it
    is; any other device gets a plain ``.to``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return host if host.device == device else host.to(device)
    if host.device.type == "cuda":
        return host if host.device == device or device.index is None else host.to(device)
    if host.is_pinned() and host.is_contiguous():
        pinned = host
    else:  # a pageable (or strided) source: one host copy into pinned memory, then the DMA
        pinned = host_buffer(tuple(host.shape), host.dtype, device).copy_(host)
    (out,), event = _side_copy((pinned,), device)
    wait_copy(event, device)
    # ``pinned`` may be freed when this returns, the copy still running: it was allocated by torch's
    # caching host allocator (host_buffer, pin_memory), which records the copy's stream on a
    # non-blocking copy and does not hand the block out again before that copy has completed.
    return out
