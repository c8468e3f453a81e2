"""Selection policies: which prefix KV a Re-Prefill loads, behind one small interface.

A policy plans the first requests on the event loop (:meth:`Policy.start`) and then serves each
layer's prefix K/V on the compute thread (:meth:`Policy.kv_for_layer`). ``recompute`` loads no KV at
all and is handled by the engine's full prefill; it is listed here so every name resolves in one
place.
"""

from __future__ import annotations

import abc

import torch

from contiguouskv.compute_server.layout import sub_periods
from contiguouskv.compute_server.loader import KVLoader

POLICY_NAMES = ("recompute", "full")


class Policy(abc.ABC):
    """Chooses and requests prefix KV for one request."""

    name: str = ""
    loads_kv: bool = True

    def __init__(self, loader: KVLoader, period: int, sub_period: int) -> None:
        self.loader = loader
        self.layout = loader.layout
        self.period = period
        self.sub_period = sub_period

    @abc.abstractmethod
    async def start(self) -> None:
        """Called on the event loop before layer 0: ship the first requests."""

    @abc.abstractmethod
    def kv_for_layer(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called on the compute thread in layer order; blocks until that layer's K/V are in."""

    @property
    def chunks_loaded(self) -> int:
        return self.layout.num_chunks


class FullPolicy(Policy):
    """Every record, requested sub-period by sub-period, earlier layers first (AttentionStore-like)."""

    name = "full"

    async def start(self) -> None:
        chunks = range(self.layout.num_chunks)
        for run in sub_periods(self.layout.num_layers, self.period, self.sub_period):
            await self.loader.request_kv(chunks, run, priority=run.start)

    def kv_for_layer(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.loader.wait_for_layer(layer, range(self.layout.num_chunks))
        self.loader.release_layer(layer)
        return keys, values


def make_policy(name: str, loader: KVLoader, period: int, sub_period: int) -> Policy:
    """The policy named ``name`` (one of :data:`POLICY_NAMES` that loads KV)."""
    classes: dict[str, type[Policy]] = {"full": FullPolicy}
    if name not in classes:
        raise ValueError(f"policy {name!r} loads no KV or is unknown; known: {POLICY_NAMES}")
    return classes[name](loader, period, sub_period)
