"""Identification data: low-bit keys (pure functions, property tests) and the resident ident cache."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contiguouskv.compute_server.kvio.identcache import IdentCache
from contiguouskv.compute_server.layouts.contiguous import QKEY_BITS, QKEY_GROUP, ContiguousLayout
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec, chunk_minmax
from contiguouskv.compute_server.layouts.tensors import as_bytes
from contiguouskv.compute_server.selection.chunks import exact_chunk_scores, quest_chunk_scores, select_top
from contiguouskv.compute_server.selection.keyquant import dequantize_keys, quantize_keys, quantized_bytes


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), kv_heads=st.integers(1, 3), d=st.sampled_from([4, 8, 64]),
       bits=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([8, 16, 64]), seed=st.integers(0, 1000))
def test_quantised_keys_round_trip_within_half_a_step(n: int, kv_heads: int, d: int, bits: int, group: int,
                                                      seed: int) -> None:
    keys = torch.randn(kv_heads, n, d, generator=torch.Generator().manual_seed(seed)) * 5 + 1
    record = quantize_keys(keys, bits, group)
    assert record.dtype == torch.uint8 and record.numel() == quantized_bytes(n, kv_heads, d, bits, group)
    back = dequantize_keys(record, n, kv_heads, d, bits, group)
    assert back.shape == keys.shape
    # per group, head and channel the error is at most half a step (+ float16 rounding of min and step)
    for a in range(0, n, group):
        g = keys[:, a : a + group]
        step = (g.amax(dim=1) - g.amin(dim=1)) / ((1 << bits) - 1)  # [kv_heads, d]
        err = (back[:, a : a + group] - g).abs().amax(dim=1)
        assert bool((err <= step / 2 + 2e-3 * g.abs().amax(dim=1) + 1e-3).all())
    # values at a group's extremes are exact up to float16
    lo = keys[:, :group].amin(dim=1)
    assert torch.allclose(back[:, :group].amin(dim=1), lo, rtol=2e-3, atol=2e-3)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 400), bits=st.sampled_from([1, 2, 4]), group=st.sampled_from([64, 128]),
       seed=st.integers(0, 1000), heavy=st.booleans())
def test_least_squares_levels_never_do_worse_than_min_max(n: int, bits: int, group: int, seed: int,
                                                          heavy: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, 16, generator=g) * 4
    if heavy:  # heavy-tailed channels: where min/max levels waste the most
        keys = keys ** 3 / 16
    err = {}
    for fit in ("minmax", "lloyd"):
        back = dequantize_keys(quantize_keys(keys, bits, group, fit), n, 2, 16, bits, group)
        err[fit] = float(((back - keys) ** 2).mean())
    assert err["lloyd"] <= err["minmax"] * 1.0001 + 1e-6
    if bits == 1 and n >= 64:  # at 1 bit the means of either side beat the extremes by far
        assert err["lloyd"] < 0.7 * err["minmax"]


def test_quantisation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(torch.zeros(1, 4, 4), 3, 64)
    with pytest.raises(ValueError, match="group"):
        quantize_keys(torch.zeros(1, 4, 4), 2, 6)
    with pytest.raises(ValueError, match="fit"):
        quantize_keys(torch.zeros(1, 4, 4), 2, 64, "median")
    with pytest.raises(ValueError, match="expected"):
        dequantize_keys(torch.zeros(10, dtype=torch.uint8), 4, 1, 4, 2, 64)


def test_constant_channels_quantise_exactly() -> None:
    keys = torch.full((2, 70, 8), 3.25)
    assert torch.equal(dequantize_keys(quantize_keys(keys, 2, 64), 70, 2, 8, 2, 64), keys)


def test_codec_round_trips_identification_regions() -> None:
    lay = ContiguousLayout(num_tokens=150, num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    codec = ContiguousCodec(lay)
    keys = (torch.randn(2, 150, 8) * 3).to(torch.bfloat16)
    record = bytes(as_bytes(quantize_keys(keys, QKEY_BITS, QKEY_GROUP)))
    assert len(record) == lay.qkeys_record_size == lay.ident_record_size("qkeys")
    assert torch.equal(codec.qkeys(record), dequantize_keys(quantize_keys(keys, QKEY_BITS, QKEY_GROUP), 150, 2, 8,
                                                            QKEY_BITS, QKEY_GROUP))
    one_bit = bytes(as_bytes(quantize_keys(keys, 1, 128, "lloyd")))
    # 2 groups of 128 x 2 heads x 8 channels x (4 + 16) bytes, against 3 groups of 64 x ... x (4 + 16)
    assert len(one_bit) == lay.ident_record_size("qkeys1") == 640 and lay.ident_record_size("qkeys") == 960
    assert torch.equal(codec.qkeys(one_bit, kind="qkeys1"),
                       dequantize_keys(quantize_keys(keys, 1, 128, "lloyd"), 150, 2, 8, 1, 128))
    mm = chunk_minmax(lay, keys)
    assert len(bytes(as_bytes(mm))) == lay.minmax_record_size
    assert torch.equal(codec.minmax(bytes(as_bytes(mm))), mm)
    # the partial last chunk (tokens 144..149) bounds its real tokens only
    assert torch.equal(mm[-1, :, 0], keys[:, 144:].amin(dim=1)) and torch.equal(mm[-1, :, 1], keys[:, 144:].amax(dim=1))
    # 2-bit keys over 64-token groups: 20 bytes per channel per 64 tokens against 128 of bf16 keys
    assert lay.qkeys_record_size / (lay.num_chunks * lay.token_bytes) == pytest.approx(20 / 128, rel=0.25)
    with pytest.raises(ValueError, match="identification region"):
        lay.ident_record_size("nope")


def test_quest_bound_is_an_upper_bound_and_ranks_a_planted_chunk_first() -> None:
    torch.manual_seed(0)
    lay = ContiguousLayout(num_tokens=160, num_layers=1, num_kv_heads=1, head_dim=16, dtype="float32")
    keys = torch.randn(1, 160, 16)
    q = torch.randn(16).expand(2, 3, 16) + 0.1 * torch.randn(2, 3, 16)  # every head and token alike
    keys[0, 80:96] = q[0, 0] * 3 + 0.1 * torch.randn(16, 16)  # chunk 5 matches the query strongly
    k_self = torch.randn(1, 3, 16)
    mm = chunk_minmax(lay, keys)
    center, radius = (mm[:, :, 0] + mm[:, :, 1]) / 2, (mm[:, :, 1] - mm[:, :, 0]) / 2
    upper = q[0] @ center[:, 0].T + q[0].abs() @ radius[:, 0].T  # [T, m]
    dots = (q[0] @ keys[0].T).view(3, 10, 16)  # [T, m, c]
    assert bool((upper[:, :, None] >= dots - 1e-4).all())
    quest = quest_chunk_scores(lay, q, k_self, mm, 0.25)
    exact = exact_chunk_scores(lay, q, k_self, keys, 0.25)
    assert select_top(quest, 0.3)[1] == 5 and 5 in select_top(exact, 0.3)


def test_ident_cache_is_a_per_prefix_lru_under_its_budget() -> None:
    cache = IdentCache(max_bytes=100)
    assert cache.get("a", "lay", "qkeys/L0") is None
    assert cache.put("a", "lay", "qkeys/L0", (b"x" * 30,))
    assert cache.put("a", "lay", "qkeys/L1", (b"x" * 20, b"y" * 10))
    assert cache.put("b", "lay", "qkeys/L0", (b"z" * 30,))
    assert cache.get("a", "lay", "qkeys/L1") == (b"x" * 20, b"y" * 10)  # a is now most recent
    assert cache.put("c", "lay", "qkeys/L0", (b"w" * 30,))  # 120 > 100: evicts b (least recent), not a
    assert cache.get("b", "lay", "qkeys/L0") is None
    assert cache.get("a", "lay", "qkeys/L0") == (b"x" * 30,)
    stats = cache.stats()
    assert (stats.bytes, stats.prefixes, stats.evicted_prefixes) == (90, 2, 1)
    assert not cache.put("d", "lay", "big", (b"q" * 101,))  # never fits: refused, nothing kept for d
    assert cache.get("d", "lay", "big") is None and cache.stats().prefixes == 2  # a and c untouched
    cache.forget("a")
    assert cache.get("a", "lay", "qkeys/L0") is None and cache.stats().bytes <= 30
    with pytest.raises(ValueError):
        IdentCache(-1)


def test_ident_cache_is_thread_safe() -> None:
    cache = IdentCache(max_bytes=10_000)

    def work(t: int) -> None:
        for i in range(300):
            cache.put(f"p{(t * 7 + i) % 13}", "lay", f"r{i % 5}", (b"x" * 97,))
            cache.get(f"p{i % 13}", "lay", f"r{i % 5}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert 0 < stats.bytes <= 10_000 and stats.bytes % 97 == 0
