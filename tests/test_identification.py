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
from contiguouskv.compute_server.config import ComputeServerConfig
from contiguouskv.compute_server.config import SCORE_HEADS
from contiguouskv.compute_server.selection.chunks import (
    exact_chunk_scores, packed_chunk_scores, query_window, quest_chunk_scores, score_dtype, select_top,
)
from contiguouskv.compute_server.selection.keyquant import (
    PackedKeys, dequantize_keys, dequantized_shape, quantize_keys, quantized_bytes,
)
from contiguouskv.compute_server.workspace import Workspace


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


def _whole(keys: PackedKeys) -> torch.Tensor:
    """Every group of a parsed record decoded, ``[kv_heads, n, d]`` float32."""
    out = torch.empty(keys.kv_heads, keys.num_groups * keys.group, keys.head_dim)
    return keys.decode(out, slice(None), 0, keys.num_groups)[:, : keys.num_tokens]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), kv_heads=st.integers(1, 3), bits=st.sampled_from([1, 2, 4, 8]),
       group=st.sampled_from([8, 64, 128]), seed=st.integers(0, 1000))
def test_decoding_into_a_reused_buffer_matches_a_fresh_decode(n: int, kv_heads: int, bits: int, group: int,
                                                              seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    first, second = (quantize_keys(torch.randn(kv_heads, n, 8, generator=gen) * 3, bits, group) for _ in range(2))
    buffer = torch.full(dequantized_shape(n, kv_heads, 8, group), float("nan"))  # stale contents must not leak
    for record in (first, second):  # the second decode overwrites the first in the same buffer
        into = dequantize_keys(record, n, kv_heads, 8, bits, group, out=buffer)
        assert into.data_ptr() == buffer.data_ptr() and into.shape == (kv_heads, n, 8)
        # reference: unpack slot by slot with plain shifts, scale, then reorder (the record format)
        per_byte, groups = 8 // bits, -(-n // group)
        split = groups * kv_heads * 4 * 8
        scales = record[:split].view(torch.float16).view(groups, kv_heads, 2, 8).float()
        packed = record[split:].view(groups, kv_heads, group // per_byte, 8)
        codes = torch.stack([(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per_byte)], dim=3)
        ref = scales[:, :, 0:1] + codes.view(groups, kv_heads, group, 8).float() * scales[:, :, 1:2]
        assert torch.equal(into, ref.transpose(0, 1).reshape(kv_heads, groups * group, 8)[:, :n])
        assert torch.equal(into, dequantize_keys(record, n, kv_heads, 8, bits, group))


def test_decoding_rejects_a_wrong_buffer() -> None:
    record = quantize_keys(torch.randn(2, 70, 8), 2, 64)
    for bad in (torch.empty(2, 70, 8), torch.empty(2, 128, 8, dtype=torch.float16),
                torch.empty(8, 128, 2).transpose(0, 2)):
        with pytest.raises(ValueError, match="out must be"):
            dequantize_keys(record, 70, 2, 8, 2, 64, out=bad)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), t=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
       seed=st.integers(0, 1000), half=st.booleans(), heads=st.sampled_from(SCORE_HEADS), window=st.integers(0, 10))
def test_exact_scores_equal_the_materialised_softmax(n: int, t: int, kv_heads: int, groups: int, seed: int,
                                                     half: bool, heads: str, window: int) -> None:
    """The in-place scoring (row max, exp in the logits buffer, one matrix-vector product per KV
    head, or a batched one per query head) against the definition written out: softmax over
    [prefix ; causal self] per query head and token, prefix columns summed over the query's last
    ``window`` tokens (0: all), per chunk, then summed over heads (the paper's rule) or the largest
    head's."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, d, scale = kv_heads * groups, 8, 0.4
    lay = ContiguousLayout(num_tokens=n, num_layers=1, num_kv_heads=kv_heads, head_dim=d, dtype="float32", chunk_size=4)
    q, k_self = torch.randn(num_heads, t, d, generator=gen) * 2, torch.randn(kv_heads, t, d, generator=gen) * 2
    keys = torch.randn(kv_heads, n, d, generator=gen) * 2
    if half:  # stored-dtype keys are converted through the workspace
        keys = keys.to(torch.bfloat16)
    per_head = []
    for h in range(num_heads):
        kv = h // groups
        mine = q[h].double()
        logits = torch.cat([mine @ keys[kv].double().T,
                            (mine @ k_self[kv].double().T).masked_fill(
                                torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))], dim=1) * scale
        rows = range(t - window, t) if 0 < window < t else range(t)
        mass = torch.softmax(logits, dim=1)[list(rows), :n].sum(dim=0)
        per_head.append(torch.nn.functional.pad(mass, (0, lay.num_chunks * 4 - n)).view(-1, 4).sum(dim=1))
    stacked = torch.stack(per_head)
    ref = stacked.sum(dim=0) if heads == "sum" else stacked.amax(dim=0)
    workspace = Workspace()
    for _ in range(2):  # the second call reuses (and must overwrite) the first call's scratch
        got = exact_chunk_scores(lay, query_window(q, window), k_self, keys, scale, workspace, heads=heads)
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), t=st.integers(1, 6), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
       bits_group=st.sampled_from([(2, 64), (1, 128), (2, 8)]), tile=st.sampled_from([None, 1, 64, 100, 256]),
       low=st.booleans(), heads=st.sampled_from(SCORE_HEADS), seed=st.integers(0, 1000))
def test_tiled_packed_scores_equal_the_scores_of_the_decoded_keys(n: int, t: int, kv_heads: int, groups: int,
                                                                 bits_group: tuple[int, int], tile: int | None,
                                                                 low: bool, heads: str, seed: int) -> None:
    """Decoding a tile of whole groups at a time (a tile smaller than a group still takes one; a
    partial last group; one tile for all) scores exactly what decoding the layer whole does, in
    float32 and bfloat16, both head rules; the second call reuses the first call's tile buffer."""
    bits, group = bits_group
    gen = torch.Generator().manual_seed(seed)
    lay = ContiguousLayout(num_tokens=n, num_layers=1, num_kv_heads=kv_heads, head_dim=8, dtype="float32",
                           chunk_size=4)
    q, k_self = torch.randn(kv_heads * groups, t, 8, generator=gen), torch.randn(kv_heads, t, 8, generator=gen)
    record = quantize_keys(torch.randn(kv_heads, n, 8, generator=gen) * 2, bits, group)
    dtype = torch.bfloat16 if low else torch.float32
    decoded = dequantize_keys(record, n, kv_heads, 8, bits, group, dtype=dtype)
    want = exact_chunk_scores(lay, q, k_self, decoded, 0.3, dtype=dtype, heads=heads)
    workspace = Workspace()
    for _ in range(2):
        got = packed_chunk_scores(lay, q, k_self, PackedKeys(record, n, kv_heads, 8, bits, group), 0.3, workspace,
                                  dtype, heads, tile)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()


def test_a_packed_record_of_the_wrong_size_or_a_wrong_tile_is_refused() -> None:
    record = quantize_keys(torch.randn(2, 70, 8), 2, 64)
    with pytest.raises(ValueError, match="expected"):
        PackedKeys(record[:-1], 70, 2, 8, 2, 64)
    keys = PackedKeys(record, 70, 2, 8, 2, 64)
    with pytest.raises(ValueError, match="out must be"):
        keys.decode(torch.empty(1, 100, 8), slice(0, 1), 0, 2)


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
    assert torch.equal(_whole(codec.packed_qkeys(record)),
                       dequantize_keys(quantize_keys(keys, QKEY_BITS, QKEY_GROUP), 150, 2, 8, QKEY_BITS, QKEY_GROUP))
    one_bit = bytes(as_bytes(quantize_keys(keys, 1, 128, "lloyd")))
    # 2 groups of 128 x 2 heads x 8 channels x (4 + 16) bytes, against 3 groups of 64 x ... x (4 + 16)
    assert len(one_bit) == lay.ident_record_size("qkeys1") == 640 and lay.ident_record_size("qkeys") == 960
    assert torch.equal(_whole(codec.packed_qkeys(one_bit, kind="qkeys1")),
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


def test_score_dtype_setting_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert score_dtype("float32", cpu) == torch.float32
    assert score_dtype("bfloat16", cpu) == torch.bfloat16
    assert score_dtype("float32", torch.device("cuda")) == torch.float32  # an explicit setting wins on any device
    assert score_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert score_dtype("auto", torch.device("meta")) == torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert score_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="score_dtype"):
        score_dtype("float16", cpu)
    with pytest.raises(ValueError, match="score_dtype"):
        ComputeServerConfig(model="random:tiny", cache=("h:1",), score_dtype="half")
    with pytest.raises(ValueError, match="look_ahead_threads"):
        ComputeServerConfig(model="random:tiny", cache=("h:1",), look_ahead_threads=-1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), t=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
       seed=st.integers(0, 1000), stored=st.sampled_from([torch.float32, torch.bfloat16]))
def test_bfloat16_scores_round_only_the_products(n: int, t: int, kv_heads: int, groups: int, seed: int,
                                                 stored: torch.dtype) -> None:
    """With ``dtype=bfloat16`` the scaled query, the keys and each q.k product are bfloat16 and the
    rest is float32: the scores match a float64 reference that rounds exactly those, far closer than
    they match the float32 scores (which they must not equal: the rounding is really there)."""
    gen = torch.Generator().manual_seed(seed)
    heads, d, scale = kv_heads * groups, 16, 0.3
    lay = ContiguousLayout(num_tokens=n, num_layers=1, num_kv_heads=kv_heads, head_dim=d, dtype="float32", chunk_size=4)
    q, k_self = torch.randn(heads, t, d, generator=gen) * 2, torch.randn(kv_heads, t, d, generator=gen) * 2
    keys = (torch.randn(kv_heads, n, d, generator=gen) * 2).to(stored)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    mass = torch.zeros(n, dtype=torch.float64)
    q16 = (q.float() * scale).bfloat16().double()
    for h in range(heads):
        kv = h // groups
        prefix = (q16[h] @ keys[kv].bfloat16().double().T).bfloat16().double()
        own = (q[h].double() @ k_self[kv].double().T * scale).masked_fill(causal, float("-inf"))
        mass += torch.softmax(torch.cat([prefix, own], dim=1), dim=1)[:, :n].sum(dim=0)
    ref = torch.nn.functional.pad(mass, (0, lay.num_chunks * 4 - n)).view(-1, 4).sum(dim=1)
    workspace = Workspace()
    low = exact_chunk_scores(lay, q, k_self, keys, scale, workspace, torch.bfloat16)
    # one product may round the other way (float32 accumulation order): 1 bf16 ulp of a logit
    assert torch.allclose(low.double(), ref, rtol=2e-2, atol=1e-4)
    high = exact_chunk_scores(lay, q, k_self, keys, scale, Workspace())
    assert (low.double() - ref).abs().sum() < (high.double() - ref).abs().sum() or torch.equal(low, high)
    if n * t >= 64:
        assert not torch.equal(low, high)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), kv_heads=st.integers(1, 3), bits=st.sampled_from([1, 2, 4, 8]),
       group=st.sampled_from([8, 64, 128]), seed=st.integers(0, 1000))
def test_bfloat16_decoding_is_the_float32_decoding_rounded(n: int, kv_heads: int, bits: int, group: int,
                                                           seed: int) -> None:
    """Decoding into bfloat16 (codes exact, min and step rounded to bfloat16, the key rounded once)
    stays within two bfloat16 roundings of the float32 decoding, in a reused buffer too."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, n, 8, generator=gen) * 3 + 1
    record = quantize_keys(keys, bits, group)
    exact = dequantize_keys(record, n, kv_heads, 8, bits, group)
    buffer = torch.full(dequantized_shape(n, kv_heads, 8, group), float("nan"), dtype=torch.bfloat16)
    low = dequantize_keys(record, n, kv_heads, 8, bits, group, out=buffer)
    assert low.dtype == torch.bfloat16 and low.data_ptr() == buffer.data_ptr()
    assert torch.equal(low, dequantize_keys(record, n, kv_heads, 8, bits, group, dtype=torch.bfloat16))
    # per value: the rounding of min, of step (times a code <= 255) and of the sum, each 2^-8 relative
    per_byte, groups = 8 // bits, -(-n // group)
    scales = record[: groups * kv_heads * 32].view(torch.float16).view(groups, kv_heads, 2, 8).float()
    bound = (scales[:, :, 0].abs() + scales[:, :, 1].abs() * ((1 << bits) - 1)).transpose(0, 1)  # [kvH, G, d]
    bound = bound.repeat_interleave(group, dim=1)[:, :n] * 3 * 2.0 ** -8 + 1e-6
    assert bool(((low.float() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="dtype"):
        dequantize_keys(record, n, kv_heads, 8, bits, group, dtype=torch.float16)
