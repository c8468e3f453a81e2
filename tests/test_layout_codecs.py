"""Layout codecs own both directions: what ``pack`` stores, the load side reads back bit for bit.

The `contiguous` codec's save (``pack``) and load (``kv_requests`` -> ``kv_records`` -> ``gather``,
``chunk_keys``, ``digest``, ``importance``, ``tokens``) round-trip on random geometries, with the
records laid out exactly as a cache server would serve them (regions of fixed-size records).
"""

from __future__ import annotations

import random
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contiguouskv.compute_server.layouts.base import KVGeometry, PrefilledPrefix
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec, chunk_digest, ref_runs
from contiguouskv.compute_server.layouts.impress_codec import ImpressCodec
from contiguouskv.compute_server.layouts.registry import LAYOUT_CODECS, build_codec, parse_codec
from contiguouskv.compute_server.layouts.tensors import frombuffer
from contiguouskv.compute_server.selection.importance import window_importance
from contiguouskv.compute_server.workspace import Workspace


def _stored(codec: ContiguousCodec, prefix: PrefilledPrefix, batch_bytes: int) -> dict[str, bytearray]:
    regions = {r.name: r for r in codec.regions()}
    stored = {name: bytearray(r.num_records * r.record_size) for name, r in regions.items()}
    for region, first, data in codec.pack(prefix, batch_bytes):
        size = regions[region].record_size
        assert len(data) % size == 0 and first + len(data) // size <= regions[region].num_records
        stored[region][first * size : first * size + len(data)] = bytes(data)
    return stored


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 90), st.integers(1, 5), st.integers(1, 3), st.sampled_from([4, 8]), st.integers(1, 20),
       st.integers(1, 4), st.integers(64, 4096), st.randoms(use_true_random=False))
def test_contiguous_pack_and_load_round_trip(n: int, layers: int, kv_heads: int, head_dim: int, chunk: int,
                                             group: int, batch: int, rng: random.Random) -> None:
    geometry = KVGeometry(layers, 2 * kv_heads, kv_heads, head_dim, "float32", chunk, group)
    codec = ContiguousCodec.for_prefix(n, geometry)
    lay = codec.geometry
    torch.manual_seed(rng.randrange(1 << 30))
    keys = [torch.randn(kv_heads, n, head_dim) for _ in range(layers)]
    values = [torch.randn(kv_heads, n, head_dim) for _ in range(layers)]
    queries = [torch.randn(2 * kv_heads, min(n, 3), head_dim) for _ in range(layers)]
    ids = [rng.randrange(1000) for _ in range(n)]
    prefix = PrefilledPrefix(ids, keys, values, queries, 0.5)
    stored = _stored(codec, prefix, batch)
    sizes = {r.name: r.record_size for r in codec.regions()}

    def records(region: str, indices: list[int]) -> memoryview:
        size = sizes[region]
        return memoryview(b"".join(bytes(stored[region][i * size : (i + 1) * size]) for i in indices))

    chunks = sorted(rng.sample(range(lay.num_chunks), rng.randint(1, lay.num_chunks)))
    layer_run = range(rng.randrange(layers), layers)
    arrived: dict[int, dict[int, tuple[torch.Tensor, int]]] = {}
    for region, indices in codec.kv_requests(chunks, layer_run).items():
        for layer, unit, batch, row in codec.kv_records(region, indices, records(region, indices)) or []:
            arrived.setdefault(layer, {})[unit] = (batch, row)
    assert sorted(arrived) == list(layer_run)
    tokens = torch.cat([torch.arange(*lay.chunk_tokens(c)) for c in chunks])
    for layer in layer_run:
        assert sorted(arrived[layer]) == chunks
        k, v = codec.gather(chunks, [arrived[layer][c] for c in chunks], pin=False)
        assert torch.equal(k, keys[layer][:, tokens]) and torch.equal(v, values[layer][:, tokens])
    for region in ("stats", "tokens", "digest/L0", "idkeys/L0"):
        assert codec.kv_records(region, [0], records(region, [0])) is None  # whole records, not K/V
    every = list(range(lay.num_chunks))
    assert torch.equal(codec.layer_keys([records("idkeys/L0", [c]) for c in every]), keys[0])
    scratch = Workspace()  # into reused float32 scratch: the same keys, converted in the copy
    first = codec.layer_keys([records("idkeys/L0", [c]) for c in every], scratch=scratch)
    assert first.dtype == torch.float32 and torch.equal(first, keys[0].float())
    last = len(keys) - 1
    again = codec.layer_keys([records(f"idkeys/L{last}", [c]) for c in every], scratch=scratch)
    assert torch.equal(again, keys[last].float()) and again.data_ptr() == first.data_ptr()
    padded = _padded_keys(keys[0], lay.chunk_size, lay.num_chunks)  # the last chunk's records are zero-padded
    assert torch.equal(codec.chunk_keys([records("idkeys/L0", [c]) for c in chunks]),
                       padded[:, _chunk_slots(chunks, lay.chunk_size)])
    torch.testing.assert_close(codec.digest(records("digest/L0", [0])), chunk_digest(lay, keys[0]))
    expected = torch.stack([window_importance(lay, q, k, 0.5) for q, k in zip(queries, keys)])
    assert torch.equal(codec.importance(records("stats", [0])), expected)
    assert codec.tokens(records("tokens", [0])) == ids


def _padded_keys(k: torch.Tensor, c: int, m: int) -> torch.Tensor:
    return torch.nn.functional.pad(k, (0, 0, 0, m * c - k.shape[1]))


def _chunk_slots(chunks: list[int], c: int) -> torch.Tensor:
    return torch.cat([torch.arange(j * c, (j + 1) * c) for j in chunks])


def test_the_loader_side_never_sees_region_names_it_cannot_own() -> None:
    codec = ContiguousCodec.for_prefix(40, KVGeometry(3, 2, 1, 4, "float32", 16, 2))
    assert codec.geometry.group_of_region("kv/G1") == 1
    for name in ("kv/G2", "kv/G", "kv/Gx", "idkeys/L0", "k/L0", "G1"):  # 3 layers in groups of 2: G0, G1
        assert codec.geometry.group_of_region(name) is None
    impress = ImpressCodec.for_prefix(40, KVGeometry(3, 2, 1, 4, "float32"))
    assert impress.kv_records("k/L0", [0], memoryview(bytes(impress.geometry.block_record_size))) is None
    with pytest.raises(ValueError, match="no per-layer K/V records"):
        impress.kv_requests([0], range(1))


def test_codecs_by_kind_and_from_their_metadata() -> None:
    geometry = KVGeometry(3, 4, 2, 8, "bfloat16", 16, 8)
    assert set(LAYOUT_CODECS) == {"contiguous", "impress"}
    for kind in LAYOUT_CODECS:
        codec = build_codec(kind, 100, geometry)
        again, extra = parse_codec(kind, codec.to_metadata(model_fingerprint="abc"))
        assert again == codec and extra["model_fingerprint"] == "abc" and codec.kind == kind
    with pytest.raises(ValueError, match="unknown layout 'quest'"):
        build_codec("quest", 100, geometry)
    with pytest.raises(ValueError, match="unsupported layout metadata"):
        parse_codec("impress", build_codec("contiguous", 100, geometry).to_metadata())


def test_views_over_read_only_bytes_warn_nothing_and_leave_the_warning_filters_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's one read-only-buffer warning is spent at import; decoding a record neither warns
    (``-W error`` in a fresh process) nor swaps the process's warning filters (not thread-safe)."""
    code = ("import torch\n"
            "from contiguouskv.compute_server.layouts.tensors import frombuffer\n"
            "t = frombuffer(memoryview(bytes(range(8))), torch.uint8)\n"
            "assert t.tolist() == list(range(8))\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    swaps: list[object] = []
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: swaps.append(a) or pytest.fail("swapped"))
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: swaps.append(a))
    assert frombuffer(b"\0" * 16, torch.float32).shape == (4,)
    assert swaps == []


def test_ref_runs_cut_records_into_strided_runs_of_one_batch() -> None:
    a, b = torch.zeros(1), torch.zeros(1)  # two batches: identity, not value, tells them apart
    parts = [(a, 0), (a, 4), (a, 8), (a, 9), (b, 1), (b, 2), (b, 3), (a, 12), (a, 11), (a, 20)]
    runs = [(start, stop, batch is a, row, step) for start, stop, batch, row, step in ref_runs(parts)]
    assert runs == [(0, 3, True, 0, 4), (3, 4, True, 9, 1), (4, 7, False, 1, 1), (7, 8, True, 12, 1),
                    (8, 10, True, 11, 9)]
    # every part is in exactly one run, and the run's arithmetic gives back its rows
    for start, stop, batch, row, step in ref_runs(parts):
        assert [(batch, row + k * step) for k in range(stop - start)] == parts[start:stop]
    assert list(ref_runs([])) == []
