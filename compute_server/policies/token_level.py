"""Shared machinery of the token-level baselines (`h2o`, `impress`): block reads, gathering,
accounting and the attention report, over the `impress` layout (64-token K/V blocks, probe keys,
static token importance; :mod:`..layouts.impress`).

Devices: blocks and probe keys are decoded onto the compute device (``self.projector.device``)
through the codec, i.e. :func:`~..kvio.staging.to_device_now`; selection and gathering run there.
Per layer, one ``tolist`` (the blocks to read) crosses to the host, and the selection's token
set and scores are then copied to the host for the usage and the attention report, so the event
loop never waits on the device.
"""

from __future__ import annotations

from concurrent.futures import Future
import torch

from contiguouskv.compute_server.cachenet.attention import RegionScores
from contiguouskv.compute_server.layouts.impress import token_budget
from contiguouskv.compute_server.layouts.impress_codec import ImpressCodec
from contiguouskv.compute_server.kvio.loader import Records
from contiguouskv.compute_server.policies.base import LayerSelection, LoadingPolicy, LoadUsage, PolicyContext


class TokenPolicy(LoadingPolicy):
    """Shared machinery of the token-level baselines: block reads, gathering, accounting, report."""

    layout = ImpressCodec.kind

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        assert isinstance(context.codec, ImpressCodec), "token-level policies read the impress layout"
        self.codec = context.codec
        self.blocks = context.codec.geometry
        self.k = token_budget(self.budget, self.blocks.num_tokens)
        self.selections: list[LayerSelection] = []

    # --- reads ---------------------------------------------------------------------------------
    def _request(self, region: str, indices: list[int], category: str, priority: int) -> Future[Records]:
        return self.loader.start_blob(region, indices, priority=priority, category=category)

    def _wait(self, future: Future[Records]) -> tuple[Records, float]:
        return self.loader.wait_blob(future)

    # --- gathering -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The compute device: where decoded blocks go and selection runs."""
        return self.projector.device

    def _positions(self, blocks: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Where each token sits in the concatenation of ``blocks``' records (on ``tokens``' device)."""
        b, device = self.blocks.block_size, tokens.device
        rank = torch.full((self.blocks.num_blocks,), -1, dtype=torch.int64, device=device)
        rank[torch.tensor(blocks, dtype=torch.int64, device=device)] = torch.arange(len(blocks), device=device)
        return rank[tokens // b] * b + tokens % b

    @staticmethod
    def _take(data: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` [kv_heads, k] of each head of ``data`` [kv_heads, s, d]: [kv_heads, k, d]."""
        return torch.gather(data, 1, positions[:, :, None].expand(-1, -1, data.shape[2]))

    def _selection(self, layer: int, tokens: torch.Tensor, shared: bool,
                   scores: torch.Tensor | None = None) -> LayerSelection:
        """The record of a layer's choice: the blocks holding ``tokens`` (the one ``tolist`` of the
        selection), and host copies of ``tokens`` and ``scores`` for the usage and the report (made
        right after that synchronising ``tolist``, so they cost a small copy, not another wait)."""
        blocks = self.blocks.blocks_holding(torch.unique(tokens).tolist())
        return LayerSelection(layer, tokens.cpu(), shared, blocks,
                              bytes_selected=self.blocks.selected_bytes(tokens.shape[1]),
                              scores=None if scores is None else scores.cpu())

    # --- reporting -----------------------------------------------------------------------------
    def usage(self) -> LoadUsage:
        """Per layer: the 64-token blocks read for attention, their bytes, identification bytes."""
        sels = tuple(self.selections)
        return LoadUsage(
            layer_chunks=tuple(len(s.blocks) for s in sels),
            bytes_identification=self.loader.bytes_by_category.get("ident", 0),
            bytes_kv=self.loader.bytes_by_category.get("kv", 0),
            layer_bytes=tuple(s.bytes_kv for s in sels), layer_identification=tuple(s.bytes_identification for s in sels),
            layer_selected=tuple(s.bytes_selected for s in sels),
            token_layers=sels)

    def attention_report(self) -> list[RegionScores]:
        """Per region read, each block with its share of the layer's token scores and the fraction
        of its token-head slots that were selected (the `impress` cache score's important fraction).
        Probe records are reported as wholly used (each of their keys serves identification)."""
        lay = self.blocks
        b, nb = lay.block_size, lay.num_blocks
        slots = torch.full((nb,), float(b * lay.num_kv_heads), dtype=torch.float64)
        slots[-1] = (lay.num_tokens - (nb - 1) * b) * lay.num_kv_heads  # the last block may be short
        out: list[RegionScores] = []
        for sel in self.selections:
            counts = torch.bincount(sel.tokens.reshape(-1).cpu() // b, minlength=nb).double()
            fraction = (counts / slots).clamp(max=1.0)
            share = torch.zeros(nb, dtype=torch.float64)
            if sel.scores is not None and float(sel.scores.sum()) > 0:
                scores = sel.scores.double().cpu()
                share = torch.nn.functional.pad(scores, (0, nb * b - lay.num_tokens)).view(nb, b).sum(dim=1)
                share /= float(scores.sum())
            for region, blocks in sel.fetched_blocks.items():
                if region == lay.probe_region(sel.layer):
                    out.append(RegionScores(region, blocks, [0.0] * len(blocks), [1.0] * len(blocks)))
                    continue
                index = torch.tensor(blocks, dtype=torch.int64)
                out.append(RegionScores(region, blocks, share[index].tolist(), fraction[index].tolist()))
        return out
