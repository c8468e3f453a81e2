"""The `impress` layout's pure arithmetic, and its packing: exhaustive small cases and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contiguouskv.compute_server.layouts.impress import ImpressLayout, token_budget
from contiguouskv.compute_server.layouts.tensors import TORCH_DTYPES, frombuffer
from contiguouskv.compute_server.layouts.impress_codec import (
    iter_impress_payloads, unpack_blocks, unpack_token_importance,
)


@st.composite
def layouts(draw: st.DrawFn) -> ImpressLayout:
    kv_heads = draw(st.integers(1, 8))
    return ImpressLayout(num_tokens=draw(st.integers(1, 5000)), num_layers=draw(st.integers(1, 64)),
                         num_heads=kv_heads * draw(st.integers(1, 8)), num_kv_heads=kv_heads,
                         head_dim=draw(st.sampled_from([16, 64, 128])),
                         dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                         block_size=draw(st.integers(1, 128)), probe_heads=draw(st.integers(1, 5)))


@given(layouts())
def test_blocks_partition_the_tokens(layout: ImpressLayout) -> None:
    covered = [layout.block_tokens(b) for b in range(layout.num_blocks)]
    assert covered[0][0] == 0 and covered[-1][1] == layout.num_tokens
    for (s0, e0), (s1, _) in zip(covered, covered[1:]):
        assert e0 == s1 and e0 - s0 == layout.block_size
    assert layout.tokens_in(range(layout.num_blocks)) == layout.num_tokens
    assert all(layout.block_of(t) == b for b, (s, e) in enumerate(covered) for t in (s, e - 1))


@given(layouts(), st.data())
def test_blocks_holding_is_the_minimal_cover(layout: ImpressLayout, data: st.DataObject) -> None:
    tokens = data.draw(st.lists(st.integers(0, layout.num_tokens - 1), max_size=50))
    blocks = layout.blocks_holding(tokens)
    assert blocks == sorted(set(blocks))
    assert all(any(s <= t < e for s, e in map(layout.block_tokens, blocks)) for t in tokens)
    assert all(any(s <= t < e for t in tokens) for s, e in map(layout.block_tokens, blocks))


@given(layouts())
def test_probe_heads_are_the_first_attention_heads_and_their_kv_heads(layout: ImpressLayout) -> None:
    heads = list(layout.probe_query_heads)
    assert heads == list(range(min(layout.probe_heads, layout.num_heads)))
    assert set(layout.probe_kv_heads) == {h * layout.num_kv_heads // layout.num_heads for h in heads}
    assert layout.probe_record_size == len(layout.probe_kv_heads) * layout.block_size * layout.head_dim * (
        4 if layout.dtype == "float32" else 2)


@given(layouts())
def test_regions_are_unique_and_sized_from_the_geometry(layout: ImpressLayout) -> None:
    regions = layout.regions()
    assert len({r.name for r in regions}) == len(regions) == 3 * layout.num_layers + 1
    by_name = {r.name: r for r in regions}
    for l in range(layout.num_layers):
        for name in (layout.k_region(l), layout.v_region(l), layout.probe_region(l)):
            assert by_name[name].num_records == layout.num_blocks
    assert by_name[layout.k_region(0)].record_size == layout.block_record_size
    assert by_name["h2o"].num_records == layout.num_layers
    assert by_name["h2o"].record_size == 4 * layout.num_tokens
    assert layout.total_kv_bytes() == sum(r.num_records * r.record_size for r in regions
                                          if r.name[:2] in ("k/", "v/"))


@given(layouts())
def test_metadata_round_trips(layout: ImpressLayout) -> None:
    parsed, extra = ImpressLayout.from_metadata(layout.to_metadata(model_fingerprint="abc"))
    assert parsed == layout and extra["model_fingerprint"] == "abc"


@given(st.floats(0.001, 1.0), st.integers(1, 100_000))
def test_token_budget_is_ceil_of_the_fraction(budget: float, n: int) -> None:
    k = token_budget(budget, n)
    assert 1 <= k <= n and k >= budget * n - 1e-6 and (k == 1 or k - 1 < budget * n)


def test_sizes_for_real_models_and_exact_multiples() -> None:
    # Qwen2.5-7B: 28 q heads, 4 KV heads of 128, bf16: a 64-token K (or V) block is 64 KiB and the
    # probe heads 0..2 all read KV head 0, so the probe copy is a quarter of the keys.
    qwen7b = ImpressLayout(num_tokens=16384, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                           dtype="bfloat16")
    assert qwen7b.block_record_size == 64 * 1024 and qwen7b.num_blocks == 256
    assert qwen7b.probe_kv_heads == (0,) and qwen7b.probe_record_size == 16 * 1024
    assert qwen7b.name == "impress-b64-p3"
    mha = ImpressLayout(num_tokens=100, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, dtype="float32")
    assert mha.probe_kv_heads == (0, 1, 2)
    assert token_budget(0.1, 30) == 3 and token_budget(0.05, 16384) == 820 and token_budget(1.0, 7) == 7


def test_bad_geometry_and_indices_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        ImpressLayout(num_tokens=0, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, dtype="float32")
    with pytest.raises(ValueError, match="multiple"):
        ImpressLayout(num_tokens=1, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=1, dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        ImpressLayout(num_tokens=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, dtype="int8")
    layout = ImpressLayout(num_tokens=65, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32")
    assert layout.num_blocks == 2 and layout.block_tokens(1) == (64, 65)
    with pytest.raises(IndexError):
        layout.block_tokens(2)
    with pytest.raises(IndexError):
        layout.block_of(65)
    with pytest.raises(IndexError):
        layout.k_region(2)
    with pytest.raises(ValueError, match="unsupported"):
        ImpressLayout.from_metadata(b'{"layout": "contiguous", "version": 1}')


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 200), st.integers(1, 3), st.sampled_from([(4, 2), (3, 3), (6, 1)]), st.integers(1, 70))
def test_packing_round_trips_every_record(n: int, layers: int, heads: tuple[int, int], block: int) -> None:
    num_heads, kv_heads = heads
    lay = ImpressLayout(num_tokens=n, num_layers=layers, num_heads=num_heads, num_kv_heads=kv_heads, head_dim=4,
                        dtype="float32", block_size=block)
    keys = [torch.randn(kv_heads, n, 4) for _ in range(layers)]
    values = [torch.randn(kv_heads, n, 4) for _ in range(layers)]
    importance = torch.rand(layers, n)
    stored: dict[str, bytearray] = {r.name: bytearray(r.num_records * r.record_size) for r in lay.regions()}
    sizes = {r.name: r.record_size for r in lay.regions()}
    for region, first, data in iter_impress_payloads(lay, keys, values, importance, batch_bytes=300):
        assert len(data) % sizes[region] == 0
        stored[region][first * sizes[region] : first * sizes[region] + len(data)] = bytes(data)

    def records(region: str, indices: list[int]) -> list[bytes]:
        size = sizes[region]
        return [bytes(stored[region][i * size : (i + 1) * size]) for i in indices]

    every = list(range(lay.num_blocks))
    for l in range(layers):
        assert torch.equal(unpack_blocks(lay, records(lay.k_region(l), every), kv_heads)[:, :n], keys[l])
        assert torch.equal(unpack_blocks(lay, records(lay.v_region(l), every), kv_heads)[:, :n], values[l])
        probe = unpack_blocks(lay, records(lay.probe_region(l), every), len(lay.probe_kv_heads))[:, :n]
        assert torch.equal(probe, keys[l][list(lay.probe_kv_heads)])
        padding = unpack_blocks(lay, records(lay.k_region(l), every), kv_heads)[:, n:]
        assert not padding.any()
        last = lay.num_blocks - 1  # one block alone sits where the token math says
        s, e = lay.block_tokens(last)
        assert torch.equal(unpack_blocks(lay, records(lay.v_region(l), [last]), kv_heads)[:, : e - s],
                           values[l][:, s:e])
    assert torch.equal(unpack_token_importance(lay, records("h2o", list(range(layers)))), importance)
    assert frombuffer(records("h2o", [0])[0], TORCH_DTYPES["float32"]).shape == (n,)
