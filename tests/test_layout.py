"""Pure layout arithmetic: exhaustive small cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout, ceil_div, sub_periods

layouts = st.builds(
    ContiguousLayout,
    num_tokens=st.integers(1, 5000),
    num_layers=st.integers(1, 64),
    num_kv_heads=st.integers(1, 8),
    head_dim=st.sampled_from([16, 64, 128]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    chunk_size=st.integers(1, 64),
    group_size=st.integers(1, 16),
)


@given(layouts)
def test_chunks_partition_the_tokens(layout: ContiguousLayout) -> None:
    covered = [layout.chunk_tokens(j) for j in range(layout.num_chunks)]
    assert covered[0][0] == 0 and covered[-1][1] == layout.num_tokens
    for (s0, e0), (s1, _) in zip(covered, covered[1:]):
        assert e0 == s1 and e0 - s0 == layout.chunk_size
    assert layout.tokens_in(list(range(layout.num_chunks))) == layout.num_tokens


@given(layouts, st.data())
def test_kv_record_is_a_bijection(layout: ContiguousLayout, data: st.DataObject) -> None:
    chunk = data.draw(st.integers(0, layout.num_chunks - 1))
    layer = data.draw(st.integers(0, layout.num_layers - 1))
    region, index = layout.kv_record(chunk, layer)
    group = int(region.split("G")[1])
    assert layout.kv_record_owner(group, index) == (chunk, layer)
    sizes = {r.name: r.num_records for r in layout.regions()}
    assert 0 <= index < sizes[region]


@given(layouts, st.data())
def test_kv_records_at_is_kv_record_for_many_chunks(layout: ContiguousLayout, data: st.DataObject) -> None:
    layer = data.draw(st.integers(0, layout.num_layers - 1))
    chunks = data.draw(st.lists(st.integers(0, layout.num_chunks - 1), max_size=12))
    region, indices = layout.kv_records_at(chunks, layer)
    assert [(region, i) for i in indices] == [layout.kv_record(c, layer) for c in chunks]
    with pytest.raises(IndexError):
        layout.kv_records_at([*chunks, layout.num_chunks], layer)


def test_kv_records_cover_each_region_exactly_once() -> None:
    layout = ContiguousLayout(num_tokens=37, num_layers=11, num_kv_heads=2, head_dim=16, dtype="float32", group_size=4)
    seen: dict[str, set[int]] = {}
    for chunk in range(layout.num_chunks):
        for layer in range(layout.num_layers):
            region, index = layout.kv_record(chunk, layer)
            assert index not in seen.setdefault(region, set())
            seen[region].add(index)
    for r in layout.regions():
        if r.name.startswith("kv/"):
            assert seen[r.name] == set(range(r.num_records))
    assert layout.layers_in_group(2) == 3  # 11 layers in groups of 4: 4, 4, 3


@given(layouts, st.data())
def test_sub_period_of_a_chunk_is_one_run(layout: ContiguousLayout, data: st.DataObject) -> None:
    group = data.draw(st.integers(0, layout.num_groups - 1))
    first = group * layout.group_size
    count = data.draw(st.integers(1, layout.layers_in_group(group)))
    chunks = data.draw(st.lists(st.integers(0, layout.num_chunks - 1), min_size=1, max_size=20))
    req = layout.kv_requests(chunks, range(first, first + count))
    assert list(req) == [layout.kv_region(group)]
    indices = req[layout.kv_region(group)]
    assert len(indices) == len(set(chunks)) * count
    for i in range(0, len(indices), count):  # each chunk's layers are consecutive records
        run = indices[i : i + count]
        assert run == list(range(run[0], run[0] + count))


def test_sizes_come_from_the_model_geometry() -> None:
    # Qwen2.5-7B: 28 layers, 4 KV heads, head_dim 128, bf16: 32 KiB per chunk-layer record.
    qwen7b = ContiguousLayout(num_tokens=16384, num_layers=28, num_kv_heads=4, head_dim=128, dtype="bfloat16")
    assert qwen7b.kv_record_size == 32 * 1024
    assert qwen7b.num_chunks == 1024 and qwen7b.num_groups == 4
    assert qwen7b.total_kv_bytes() == 16384 * 28 * 2 * 4 * 128 * 2
    qwen05 = ContiguousLayout(num_tokens=100, num_layers=24, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    assert qwen05.kv_record_size == 8 * 1024


@given(layouts)
def test_metadata_round_trips(layout: ContiguousLayout) -> None:
    parsed, extra = ContiguousLayout.from_metadata(layout.to_metadata(model_fingerprint="abc"))
    assert parsed == layout and extra["model_fingerprint"] == "abc"


@given(st.integers(1, 80), st.integers(1, 16), st.integers(1, 16))
def test_sub_periods_cover_layers_in_order(num_layers: int, period: int, sub_period: int) -> None:
    if sub_period > period:
        with pytest.raises(ValueError):
            sub_periods(num_layers, period, sub_period)
        return
    runs = sub_periods(num_layers, period, sub_period)
    assert [l for r in runs for l in r] == list(range(num_layers))
    for r in runs:
        assert 1 <= len(r) <= sub_period
        assert r.start // period == (r.stop - 1) // period  # never crosses a period


def test_bad_geometry_and_indices_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        ContiguousLayout(num_tokens=0, num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        ContiguousLayout(num_tokens=1, num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8")
    layout = ContiguousLayout(num_tokens=33, num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
    with pytest.raises(IndexError):
        layout.chunk_tokens(3)
    with pytest.raises(IndexError):
        layout.kv_record(0, 2)
    assert ceil_div(33, 16) == 3 and layout.chunk_tokens(2) == (32, 33)
