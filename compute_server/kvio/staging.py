"""Staging to the device: a layer's gathered K/V copied from pinned host memory on a side stream.

The layout codec gathers a layer's arrived records into one K and one V tensor (pinned host memory
when the device is CUDA, ``LayoutCodec.gather``); on CUDA the copy to the device then runs on a side
stream, with an event the compute stream waits on. Runs on the stager thread when a layer's unit set
was announced ahead, on the compute thread otherwise.
"""

from __future__ import annotations

import torch


def to_device(keys: torch.Tensor, values: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Copy pinned K/V to the device on a side stream; returns them and the event marking the copy done.

    The pinned sources must stay referenced until the copy is done (the loader keeps them until the
    request ends)."""
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        k = keys.to(device, non_blocking=True)
        v = values.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    k.record_stream(torch.cuda.current_stream(device))
    v.record_stream(torch.cuda.current_stream(device))
    return k, v, event


def wait_copy(event: object, device: torch.device) -> None:
    """Make the compute stream wait for a :func:`to_device` copy (no-op without one)."""
    if isinstance(event, torch.cuda.Event):
        torch.cuda.current_stream(device).wait_event(event)
