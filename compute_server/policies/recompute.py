"""`recompute`: no stored KV; read the prefix's token ids and prefill prefix + query in full."""

from __future__ import annotations

import asyncio

import torch

from contiguouskv.compute_server.engine import Engine, QueryJob, QueryOutcome
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.policies.base import LoadingPolicy, LoadUsage


class RecomputePolicy(LoadingPolicy):
    """Reads only the ``tokens`` record, then runs a full prefill (the no-offloading baseline)."""

    name = "recompute"
    loads_kv = False
    selective = False

    async def start_load_kv(self) -> None:
        record = (await asyncio.wrap_future(self.loader.start_blob("tokens", [0])))[0]
        self._prefix_ids = ContiguousCodec.tokens(record)

    def wait_for_layer_load(self, layer: int, q: torch.Tensor,
                            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise RuntimeError("recompute loads no KV: compute() runs a full prefill instead")

    def compute(self, engine: Engine, job: QueryJob) -> QueryOutcome:
        return engine.recompute(self._prefix_ids, job)

    def usage(self) -> LoadUsage:
        layers = range(self.chunks.num_layers)
        zeros = tuple(0 for _ in layers)
        return LoadUsage(layer_chunks=zeros, layer_bytes=zeros, layer_identification=zeros, layer_selected=zeros)
