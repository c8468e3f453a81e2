"""The token-level baselines `h2o` and `impress` against an independent, brute-force reference.

The reference recomputes every decision from the model's own tensors with materialised attention
matrices and Python sets: h2o's static token importance (softmax column sums of the last w prefix
queries), impress's probe-head top-k sets, their mean pairwise Jaccard, the threshold j^alpha, the
vote or the per-KV-head fallback, and finally attention restricted, per head, to exactly the chosen
tokens. The served run (a ComputeCore in this process against a real cache server) must choose the
same tokens and produce the same logits. Wire-level behaviour (registration with extra layouts,
FAILED_PRECONDITION, byte accounting, read amplification) runs against a real server pair.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import grpc
import pytest
import torch

from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient, FailedPreconditionError, InvalidArgumentError
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig, default_cache_dir
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.engine import Engine
from contiguouskv.compute_server.layouts.base import KVGeometry, LayoutCodec
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.layouts.impress_codec import ImpressCodec
from contiguouskv.compute_server.request import ReprefillArgs, ReprefillReport
from contiguouskv.compute_server.scheduler import LayerScheduler
from contiguouskv.compute_server.selection.importance import per_chunk
from contiguouskv.compute_server.policies.impress import ImpressPolicy
from contiguouskv.compute_server.layouts.impress import ImpressLayout
from contiguouskv.compute_server.model.loading import LoadedModel, load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc

MODEL = "random:tiny"  # 4 layers, 4 query heads over 2 KV heads of 16, vocabulary 512
WINDOW = 32  # the compute server's default importance window
T = TypeVar("T")


@pytest.fixture(scope="module")
def cache_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        yield cache.address


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(MODEL, cache_dir=default_cache_dir())


@pytest.fixture(scope="module")
def client(cache_address: str) -> Iterator[ContiguousKVClient]:
    with launch.compute_server(MODEL, cache_address, "--dtype", "float32") as compute:
        with ContiguousKVClient(compute.address, timeout=120) as c:
            yield c


def _with_core(model: LoadedModel, address: str, fn: Callable[[ComputeCore], Awaitable[T]]) -> T:
    """Run ``fn`` on a fresh in-process ComputeCore (its own event loop) against the cache server."""
    async def main() -> T:
        config = ComputeServerConfig(model=MODEL, cache=(address,), device="cpu", dtype="float32")
        cache = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), cache)
        try:
            return await fn(core)
        finally:
            await asyncio.gather(*core._reports, return_exceptions=True)  # attention reports in flight
            core.close()
            await cache.close()

    return asyncio.run(main())


def _serve(model: LoadedModel, address: str, prefix: list[int], query: list[int], policy: str,
           budget: float) -> ReprefillReport:
    async def run(core: ComputeCore) -> ReprefillReport:
        reg = await core.register(prefix, ["impress"])
        return await core.reprefill(ReprefillArgs(reg.prefix_id, query, policy, budget, return_logits=True))

    return _with_core(model, address, run)


# --- the brute-force reference ------------------------------------------------------------------
def _top(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def _mean_jaccard(sets: list[set[int]]) -> float:
    pairs = list(itertools.combinations(sets, 2))
    return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs) if pairs else 1.0


def reference(runner: ModelRunner, prefix: list[int], query: list[int], budget: float, policy: str,
              alpha: float = 0.6) -> tuple[list[tuple[bool, list[list[int]], float, float]], torch.Tensor]:
    """Per layer (shared, token set per KV head, similarity, threshold), and last-position logits."""
    with torch.inference_mode():
        n, t = len(prefix), len(query)
        heads, kv_heads, scale = runner.num_heads, runner.num_kv_heads, runner.scaling
        group = heads // kv_heads
        keep = min(n, max(1, math.ceil(budget * n - 1e-9)))
        pre = runner.prefill(torch.tensor(prefix), keep_last_queries=min(WINDOW, n))
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        hidden = runner.embed(torch.tensor(query))
        positions = torch.arange(n, n + t)
        layers = []
        for layer in range(runner.num_layers):
            q, k, v = runner.project(layer, hidden, positions)
            pk, pv = pre.keys[layer], pre.values[layer]

            def mass(h: int) -> torch.Tensor:
                """Column sums over the query rows of head h's softmax over [prefix ; query]: [n]."""
                logits = torch.cat([q[h] @ pk[h // group].T, (q[h] @ k[h // group].T).masked_fill(causal, -math.inf)],
                                   dim=1) * scale
                return torch.softmax(logits, dim=1)[:, :n].sum(dim=0)

            similarity = threshold = -1.0
            if policy == "h2o":
                w = pre.last_queries[layer].shape[1]
                later = torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None]  # [w, n]
                static = sum(torch.softmax((pre.last_queries[layer][h] @ pk[h // group].T * scale)
                                           .masked_fill(later, -math.inf), dim=1).sum(dim=0) for h in range(heads))
                sets, shared = [_top(static.tolist(), keep)] * kv_heads, True  # type: ignore[union-attr]
            else:
                probes = {h: mass(h) for h in range(min(3, heads))}
                tops = [set(_top(m.tolist(), keep)) for m in probes.values()]
                similarity = _mean_jaccard(tops)
                r = keep / n
                threshold = (r / (2 - r)) ** alpha
                shared = similarity >= threshold
                if shared:
                    votes = [sum(i in s for s in tops) for i in range(n)]
                    total = [sum(float(m[i]) for m in probes.values()) for i in range(n)]
                    chosen = sorted(sorted(range(n), key=lambda i: (-votes[i], -total[i], i))[:keep])
                    sets = [chosen] * kv_heads
                else:
                    sets = [_top(sum(mass(h) for h in range(g * group, (g + 1) * group)).tolist(), keep)
                            for g in range(kv_heads)]
            layers.append((shared, sets, similarity, threshold))
            outs = []
            for h in range(heads):  # attention of head h over exactly its KV head's chosen tokens
                visible = torch.zeros(n, dtype=torch.bool)
                visible[sets[h // group]] = True
                logits = torch.cat([q[h] @ pk[h // group].T, q[h] @ k[h // group].T], dim=1) * scale
                hidden_mask = torch.cat([~visible.expand(t, n), causal], dim=1)
                probs = torch.softmax(logits.masked_fill(hidden_mask, -math.inf), dim=1)
                outs.append(probs @ torch.cat([pv[h // group], v[h // group]], dim=0))  # [T, d]
            hidden = runner.finish(layer, hidden, torch.stack(outs, dim=1).reshape(t, -1))
        return layers, runner.logits(hidden[-1:])[0]


CASES = [  # prefix tokens, query tokens, budget, seed
    (300, 10, 0.2, 1),
    (203, 5, 0.05, 2),
    (97, 30, 0.5, 3),
    (150, 12, 0.1, 4),
]


@pytest.mark.parametrize("policy,alpha", [("h2o", 0.6), ("impress", 0.6), ("impress", 8.0)])
@pytest.mark.parametrize("n,t,budget,seed", CASES)
def test_selection_and_output_match_the_reference(cache_address: str, model: LoadedModel, policy: str,
                                                  alpha: float, n: int, t: int, budget: float, seed: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImpressPolicy, "alpha", alpha)  # 8: threshold ~0, the probe heads always vote
    rng = random.Random(seed)
    prefix = [rng.randrange(512) for _ in range(n)]
    query = [rng.randrange(512) for _ in range(t)]
    got = _serve(model, cache_address, prefix, query, policy, budget)
    expected, logits = reference(ModelRunner(model), prefix, query, budget, policy, alpha)
    served = got.usage.token_layers
    assert len(served) == len(expected)
    for sel, (shared, sets, similarity, threshold) in zip(served, expected):
        assert sel.shared == shared, sel.layer
        assert sel.tokens.tolist() == sets, sel.layer
        assert sel.similarity == pytest.approx(similarity, abs=1e-9)
        assert sel.threshold == pytest.approx(threshold, rel=1e-12)
    if alpha == 8.0:
        assert all(sel.shared for sel in served)
    assert got.token_id == int(logits.argmax())
    assert got.outcome.logits is not None
    rel = float((got.outcome.logits - logits).abs().max() / logits.abs().max())
    assert rel < 1e-3, rel


def test_random_weights_fall_back_at_the_default_alpha(cache_address: str, model: LoadedModel) -> None:
    """Random heads agree no better than chance, so IMPRESS loads all keys and selects per KV head."""
    rng = random.Random(5)
    got = _serve(model, cache_address, [rng.randrange(512) for _ in range(400)], [1, 2, 3], "impress", 0.1)
    assert not any(sel.shared for sel in got.usage.token_layers)
    blocks = ImpressLayout(400, 4, 4, 2, 16, "float32")
    for sel in got.usage.token_layers:  # per-KV-head sets differ, and the V blocks cover their union
        assert sel.tokens[0].tolist() != sel.tokens[1].tolist()
        assert sel.blocks == blocks.blocks_holding(sel.tokens.flatten().tolist())
        assert sel.bytes_kv == (blocks.num_blocks + len(sel.blocks)) * blocks.block_record_size


def test_attention_report_gives_each_block_its_selected_fraction(cache_address: str, model: LoadedModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(6)
    prefix, query = [rng.randrange(512) for _ in range(200)], [4, 5, 6]
    reports: list[tuple[str, str, list[object]]] = []

    async def run(core: ComputeCore) -> tuple[str, ReprefillReport]:
        original = core.cache.report_attention

        async def spy(prefix_id: str, layout: str, scores: list[object]) -> None:
            reports.append((prefix_id, layout, scores))
            await original(prefix_id, layout, scores)

        monkeypatch.setattr(core.cache, "report_attention", spy)
        reg = await core.register(prefix, ["impress"])
        return reg.prefix_id, await core.reprefill(ReprefillArgs(reg.prefix_id, query, "impress", 0.1))

    prefix_id, got = _with_core(model, cache_address, run)
    blocks = ImpressLayout(200, 4, 4, 2, 16, "float32")
    [(pid, layout, scores)] = reports
    assert pid == prefix_id and layout == blocks.name
    by_region = {s.region: s for s in scores}  # type: ignore[attr-defined]
    for sel in got.usage.token_layers:
        probe = by_region[blocks.probe_region(sel.layer)]
        assert probe.indices == list(range(blocks.num_blocks)) and set(probe.important_fraction) == {1.0}
        v = by_region[blocks.v_region(sel.layer)]
        assert v.indices == sel.blocks
        for b, fraction in zip(v.indices, v.important_fraction):
            s, e = blocks.block_tokens(b)
            chosen = int(((sel.tokens >= s) & (sel.tokens < e)).sum())
            assert fraction == pytest.approx(chosen / (2 * (e - s)))
        assert sum(v.attention) <= 1.0 + 1e-6
    with grpc.insecure_channel(cache_address) as channel:  # the cache server accepts the report as sent
        request = cache_pb2.ReportAttentionRequest(prefix_id=prefix_id, layout=layout, records=[
            cache_pb2.RecordScores(region=s.region, indices=s.indices, attention=s.attention,  # type: ignore[attr-defined]
                                   important_fraction=s.important_fraction) for s in scores])  # type: ignore[attr-defined]
        cache_pb2_grpc.CacheServiceStub(channel).ReportAttention(request, timeout=30)


def test_wire_accounting_and_read_amplification(client: ContiguousKVClient) -> None:
    rng = random.Random(7)
    n = 640  # ten 64-token blocks
    reg = client.register(token_ids=[rng.randrange(512) for _ in range(n)], extra_layouts=["impress"])
    query = [rng.randrange(512) for _ in range(6)]
    blocks = ImpressLayout(n, 4, 4, 2, 16, "float32")
    keep = math.ceil(0.05 * n)
    for policy in ("h2o", "impress"):
        r = client.reprefill(reg.prefix_id, query, policy=policy, budget=0.05)
        assert r.policy == policy and r.budget == 0.05 and r.periods == ()
        assert [x.tokens for x in r.token_layers] == [keep] * 4
        assert r.bytes_selected == 4 * blocks.selected_bytes(keep) == sum(x.bytes_selected for x in r.timings.layers)
        assert r.bytes_kv == sum(x.bytes for x in r.timings.layers)
        assert r.bytes_identification == sum(x.bytes_identification for x in r.timings.layers)
        assert r.bytes_fetched == r.bytes_kv + r.bytes_identification
        assert r.read_amplification == pytest.approx(r.bytes_kv / r.bytes_selected)
        # 32 scattered tokens touch most of the ten blocks: far more read than attended to
        assert r.read_amplification > 3
        assert r.chunks_loaded == round(sum(x.blocks for x in r.token_layers) / 4)
    h2o = client.reprefill(reg.prefix_id, query, policy="h2o", budget=0.05)
    assert h2o.bytes_identification == 4 * n * 4  # the stored token scores, all layers
    assert all(x.shared and x.similarity == -1.0 for x in h2o.token_layers)
    imp = client.reprefill(reg.prefix_id, query, policy="impress", budget=0.05)
    assert imp.bytes_identification == 4 * blocks.num_blocks * blocks.probe_record_size
    for x, timing in zip(imp.token_layers, imp.timings.layers):
        expected = (2 * x.blocks if x.shared else blocks.num_blocks + x.blocks) * blocks.block_record_size
        assert timing.bytes == expected and 0 < x.threshold < 1
    contiguous = client.reprefill(reg.prefix_id, query, policy="contiguous", budget=0.05, period=1, sub_period=1)
    assert 1.0 <= contiguous.read_amplification < 1.02  # whole chunks are read and used
    decoded = client.reprefill(reg.prefix_id, query, policy="impress", budget=0.05, max_new_tokens=3)
    assert len(decoded.generated_ids) == 3  # decoding continues over the selected tokens
    exact = client.reprefill(reg.prefix_id, query, policy="impress", budget=1.0)
    assert exact.read_amplification == pytest.approx(1.0)  # 640 = 10 whole blocks: nothing wasted


def test_registration_adds_layouts_and_the_baselines_need_them(client: ContiguousKVClient) -> None:
    prefix = list(range(100, 230))
    plain = client.register(token_ids=prefix)
    for policy in ("impress", "h2o"):
        with pytest.raises(FailedPreconditionError, match="--layouts impress"):
            client.reprefill(plain.prefix_id, [1, 2], policy=policy, budget=0.5)
    client.reprefill(plain.prefix_id, [1, 2], policy="contiguous", budget=0.5)  # the others are unaffected
    added = client.register(token_ids=prefix, extra_layouts=["impress"])
    blocks = ImpressLayout(130, 4, 4, 2, 16, "float32")
    assert added.prefix_id == plain.prefix_id and not added.already_registered
    assert added.bytes_stored == sum(r.num_records * -(-r.record_size // 4096) * 4096 for r in blocks.regions())
    again = client.register(token_ids=prefix, extra_layouts=["impress"])
    assert again.already_registered and again.bytes_stored == 0
    assert client.reprefill(plain.prefix_id, [1, 2], policy="impress", budget=0.5).token_layers
    with pytest.raises(InvalidArgumentError, match="extra_layouts"):
        client.register(token_ids=prefix, extra_layouts=["quest"])
    with pytest.raises(ValueError, match="list"):
        client.register(token_ids=prefix, extra_layouts="impress")  # type: ignore[arg-type]


def test_cli_registers_the_impress_layout(client: ContiguousKVClient) -> None:
    def ckv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "contiguouskv", *args], capture_output=True, text=True,
                              timeout=120)

    ids = ",".join(str(i) for i in range(300, 400))
    reg = ckv("register", "--server", client.address, "--token-ids", ids, "--layouts", "impress", "--json")
    assert reg.returncode == 0, reg.stderr
    prefix_id = json.loads(reg.stdout)["prefix_id"]
    out = ckv("query", "--server", client.address, "--prefix", prefix_id, "--token-ids", "3,4", "--policy", "impress",
              "--budget", "0.2", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["policy"] == "impress" and len(answer["token_layers"]) == 4 and answer["read_amplification"] > 1
    bad = ckv("register", "--server", client.address, "--token-ids", ids, "--layouts", "quest")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_one_registration_prefill_feeds_both_layouts(model: LoadedModel) -> None:
    """Both layouts pack the same prefill: the `impress` layout's per-token importance sums, chunk by
    chunk, to the `contiguous` layout's chunk importance, and both hold the same keys."""
    runner = ModelRunner(model)
    ids = [random.Random(8).randrange(512) for _ in range(150)]
    scheduler = LayerScheduler(runner)
    try:
        prefix = Engine(scheduler, prefill_block=64, importance_window=WINDOW).prefill_prefix(ids)
    finally:
        scheduler.close()
    geometry = KVGeometry(4, 4, 2, 16, "float32")
    contiguous = ContiguousCodec.for_prefix(150, geometry)
    impress = ImpressCodec.for_prefix(150, geometry)

    def region_bytes(codec: LayoutCodec, region: str) -> bytes:
        return b"".join(bytes(data) for name, _, data in codec.pack(prefix, 1 << 12) if name == region)

    chunks = contiguous.importance(region_bytes(contiguous, "stats"))  # [L, m]
    raw = region_bytes(impress, "h2o")
    size = impress.geometry.importance_record_size
    tokens = impress.token_importance([raw[i : i + size] for i in range(0, len(raw), size)])  # [L, n]
    assert tokens.shape == (4, 150)
    torch.testing.assert_close(torch.stack([per_chunk(contiguous.geometry, t) for t in tokens]), chunks)
    keys = contiguous.layer_keys(_records(region_bytes(contiguous, "idkeys/L2"), contiguous.geometry.token_bytes))
    blocks = impress.blocks(_records(region_bytes(impress, "k/L2"), impress.geometry.block_record_size))[:, :150]
    assert torch.equal(keys, blocks) and torch.equal(keys, prefix.keys[2])


def _records(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]