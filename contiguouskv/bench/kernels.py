"""``contiguouskv bench kernels``: the per-layer hot-path kernels, with fresh memory and with reused buffers.

In-process, no servers: what one request's layer loop does per layer besides the model itself,
at a preset's shapes, timed two ways side by side (interleaved, the order alternating per repeat):

- ``qkeys_decode`` — a layer's 2-bit identification keys dequantised to float32 ``[kv_heads, n, d]``;
- ``exact_scores`` — a layer's chunk scores from those keys, with every query token, with the
  speculation's last ``IdentifiedPolicy.SPECULATE_TOKENS`` (16) and with the default score
  window's last ``SCORE_WINDOW`` (8; ``--score-window``), each normalised over every query key;
- ``qkeys_scores`` — the whole step from a layer's packed 2-bit record to its chunk scores, two
  ways: ``decoded`` (the layer decoded whole into a reused buffer, then ``exact_scores``) and
  ``tiled`` (:func:`~contiguouskv.compute_server.selection.chunks.packed_chunk_scores`, what
  ``contiguous+`` runs on a CPU: per KV head a 2,048-key tile decoded and multiplied at once);
- ``gather`` — a layer's arrived K/V records (rows of Fetch batches, ``(batch, row)`` references)
  gathered into ``[kv_heads, n, d]`` K and V, as the loader does for every layer of ``full`` (``reused``: into the request's pooled
  buffers, :meth:`~contiguouskv.compute_server.kvio.loader.KVLoader.consumed`);
- ``join_kv`` — ``[prefix K ; query K]`` and the same for V, the tensors attention reads.

``fresh`` allocates each output and scratch tensor anew, as the server did before it kept
per-request buffers; ``reused`` passes the buffers a request keeps (``out=``, a
:class:`~contiguouskv.compute_server.workspace.Workspace`). The difference is the page faults of
prefix-sized tensors that glibc serves with ``mmap`` (docs/performance.md). The bench applies the
compute server's malloc settings first, so it allocates as the server does.

Rows carry the ``dtype`` the kernel computes in. ``qkeys_decode`` and ``exact_scores`` are also
timed in ``bfloat16`` (``--score-dtype bfloat16``: keys decoded to bfloat16, q.k products in
bfloat16), into reused buffers, interleaved with the float32 ones; the summary gives
``float32_over_bfloat16`` for them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from contiguouskv.common.malloc import keep_freed_buffers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:kvheavy", help="a random:PRESET whose shapes to use")
    parser.add_argument("--prefix-tokens", default="4096,16384", help="comma-separated prefix lengths")
    parser.add_argument("--query-tokens", type=int, default=64, help="tokens per query (default 64)")
    parser.add_argument("--kv-dtype", default="bfloat16", help="dtype of the joined K/V (default bfloat16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per kernel and way (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the server on 2 cores)")
    parser.add_argument("--json", dest="json_path", type=Path, help="write results as JSON here")


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (kernel, prefix_tokens, query rows): fresh ÷ reused of the median milliseconds in float32
    and, where the kernel was timed in bfloat16 too, float32 ÷ bfloat16 (reused buffers both);
    for ``qkeys_scores``, decoded ÷ tiled. Rows without a ``dtype`` are float32."""
    out: list[dict[str, object]] = []
    keys = sorted({(str(r["kernel"]), int(r["prefix_tokens"]), int(r["rows"])) for r in rows})  # type: ignore[call-overload]
    for kernel, n, t in keys:
        ms = {(r["memory"], r.get("dtype", "float32")): float(r["ms_p50"]) for r in rows  # type: ignore[arg-type]
              if (r["kernel"], r["prefix_tokens"], r["rows"]) == (kernel, n, t)}
        reused = ms.get(("reused", "float32"), 0.0)
        if ("fresh", "float32") in ms and reused > 0:
            out.append({"kernel": kernel, "prefix_tokens": n, "rows": t,
                        "fresh_over_reused": ms[("fresh", "float32")] / reused})
        if ("reused", "bfloat16") in ms and reused > 0 and ms[("reused", "bfloat16")] > 0:
            out.append({"kernel": kernel, "prefix_tokens": n, "rows": t,
                        "float32_over_bfloat16": reused / ms[("reused", "bfloat16")]})
        if ms.get(("tiled", "float32"), 0.0) > 0 and ("decoded", "float32") in ms:
            out.append({"kernel": kernel, "prefix_tokens": n, "rows": t,
                        "decoded_over_tiled": ms[("decoded", "float32")] / ms[("tiled", "float32")]})
    return out


def _time(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call, ``repeats`` times, interleaved with the order alternating."""
    names = list(calls)
    for name in names:  # one warm-up each: first-call dispatch, the reused buffers' first faults
        calls[name]()
    got: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            calls[name]()
            got[name].append((time.perf_counter() - start) * 1e3)
    return got


def run(args: argparse.Namespace) -> int:
    import torch  # optional: the compute extra

    from contiguouskv.compute_server.config import SCORE_WINDOW  # optional: the compute extra
    from contiguouskv.compute_server.engine import join_kv  # optional: the compute extra
    from contiguouskv.compute_server.layouts.contiguous import (  # optional: the compute extra
        QKEY_BITS, QKEY_GROUP, ContiguousLayout,
    )
    from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec  # optional: the compute extra
    from contiguouskv.compute_server.model.presets import get_preset  # optional: the compute extra
    from contiguouskv.compute_server.policies.identified import IdentifiedPolicy  # optional: the compute extra
    from contiguouskv.compute_server.selection.chunks import (  # optional: the compute extra
        SCORE_TILE_TOKENS, exact_chunk_scores, packed_chunk_scores,
    )
    from contiguouskv.compute_server.selection.keyquant import (  # optional: the compute extra
        PackedKeys, dequantize_keys, dequantized_shape, quantize_keys,
    )
    from contiguouskv.compute_server.workspace import Workspace  # optional: the compute extra

    if not args.model.startswith("random:"):
        raise ValueError(f"--model: give a random:PRESET (its shapes are used), got {args.model!r}")
    preset = get_preset(args.model.split(":", 1)[1])
    keep_freed_buffers(os.environ, max_arenas=2)  # the compute server's malloc settings (common/malloc.py)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    kv_dtype = getattr(torch, args.kv_dtype)
    heads, kv_heads, d, t = preset.num_attention_heads, preset.num_kv_heads, preset.head_dim, args.query_tokens
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, object]] = []

    def add(kernel: str, n: int, rows_: int, got: dict[str, list[float]]) -> None:
        for way, ms in got.items():  # "fresh", "reused" (float32), "bfloat16" (reused buffers); "decoded", "tiled"
            memory, dtype = ("reused", "bfloat16") if way == "bfloat16" else (way, "float32")
            rows.append({"kernel": kernel, "memory": memory, "dtype": dtype, "prefix_tokens": n, "rows": rows_,
                         "heads": heads, "kv_heads": kv_heads, "head_dim": d, "ms_p50": statistics.median(ms),
                         "ms_min": min(ms), "repeats": len(ms)})
            print(f"{kernel:13s} n={n:6d} rows={rows_:3d} {way:8s} p50 {statistics.median(ms):8.2f} ms  "
                  f"min {min(ms):8.2f} ms", file=sys.stderr, flush=True)

    for n in [int(x) for x in args.prefix_tokens.split(",") if x]:
        lay = ContiguousLayout(n, preset.num_layers, kv_heads, d, "float32")
        record = quantize_keys(torch.randn(kv_heads, n, d, generator=gen), QKEY_BITS, QKEY_GROUP)
        buffer = torch.empty(dequantized_shape(n, kv_heads, d, QKEY_GROUP))
        low = torch.empty(dequantized_shape(n, kv_heads, d, QKEY_GROUP), dtype=torch.bfloat16)
        add("qkeys_decode", n, 0, _time({
            "fresh": lambda: dequantize_keys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP),
            "reused": lambda: dequantize_keys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP, out=buffer),
            "bfloat16": lambda: dequantize_keys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP, out=low),
        }, args.repeats))
        keys = dequantize_keys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP)
        keys16 = dequantize_keys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP, dtype=torch.bfloat16)
        k_self = torch.randn(kv_heads, t, d, generator=gen)
        for rows_ in sorted({t, min(t, IdentifiedPolicy.SPECULATE_TOKENS), min(t, SCORE_WINDOW)}):
            q = torch.randn(heads, rows_, d, generator=gen)  # the query's last rows_ tokens score
            workspace, workspace16 = Workspace(), Workspace()
            add("exact_scores", n, rows_, _time({
                "fresh": lambda: exact_chunk_scores(lay, q, k_self, keys, 0.088),
                "reused": lambda: exact_chunk_scores(lay, q, k_self, keys, 0.088, workspace),
                "bfloat16": lambda: exact_chunk_scores(lay, q, k_self, keys16, 0.088, workspace16, torch.bfloat16),
            }, args.repeats))
            packed, tiles = PackedKeys(record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP), Workspace()
            add("qkeys_scores", n, rows_, _time({  # the whole step from the packed record, both ways
                "decoded": lambda: exact_chunk_scores(lay, q, k_self, dequantize_keys(
                    record, n, kv_heads, d, QKEY_BITS, QKEY_GROUP, out=buffer), 0.088, workspace),
                "tiled": lambda: packed_chunk_scores(lay, q, k_self, packed, 0.088, tiles,
                                                     tile_tokens=SCORE_TILE_TOKENS),
            }, args.repeats))
        kv_lay = ContiguousLayout(n, preset.num_layers, kv_heads, d, args.kv_dtype)
        codec, chunks = ContiguousCodec(kv_lay), list(range(kv_lay.num_chunks))
        # as records arrive: batches of 8 chunks x a 4-layer sub-period, a layer's records every 4th row
        arrived = torch.randn(len(chunks) * 4, 2, kv_heads, kv_lay.chunk_size, d, generator=gen).to(kv_dtype)
        batches = arrived.split(8 * 4)
        parts = [(batches[c // 8], (c % 8) * 4) for c in chunks]
        numel = len(chunks) * arrived[0, 0].numel()
        pool = (torch.empty(numel, dtype=kv_dtype), torch.empty(numel, dtype=kv_dtype))
        add("gather", n, 0, _time({
            "fresh": lambda: codec.gather(chunks, parts, pin=False),
            "reused": lambda: codec.gather(chunks, parts, pin=False, out=pool),
        }, args.repeats))
        pk, pv = (torch.randn(kv_heads, n, d, generator=gen).to(kv_dtype) for _ in range(2))
        k, v = (torch.randn(kv_heads, t, d, generator=gen).to(kv_dtype) for _ in range(2))
        scratch = Workspace()
        add("join_kv", n, t, _time({
            "fresh": lambda: (join_kv(pk, k, None, "keys"), join_kv(pv, v, None, "values")),
            "reused": lambda: (join_kv(pk, k, scratch, "keys"), join_kv(pv, v, scratch, "values")),
        }, args.repeats))
    summary = summarize(rows)
    for s in summary:
        ratio = (f"fresh/reused {s['fresh_over_reused']:.2f}x" if "fresh_over_reused" in s
                 else f"decoded/tiled {s['decoded_over_tiled']:.2f}x" if "decoded_over_tiled" in s
                 else f"float32/bfloat16 {s['float32_over_bfloat16']:.2f}x")
        print(f"{s['kernel']:13s} n={s['prefix_tokens']:6d} rows={s['rows']:3d} {ratio}")
    if args.json_path:
        args.json_path.write_text(json.dumps({
            "config": {"model": args.model, "query_tokens": t, "kv_dtype": args.kv_dtype, "threads": args.threads,
                       "repeats": args.repeats, "torch": torch.__version__},
            "results": rows, "summary": summary}, indent=2) + "\n")
    return 0
