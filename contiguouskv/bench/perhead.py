"""``contiguouskv bench perhead``: does selecting chunks per KV head pay, at equal bytes?

An in-process experiment on the real model (no servers: the question is about selection, not I/O).
For each case of the quality suite, the query runs layer by layer over the prefix KV with an exact
oracle selection at every layer, two ways, at the same budget:

- ``layer``: one set of ``k`` chunks per layer, scored by the attention mass of all query heads
  (what the chunk policies read: a chunk's record holds every KV head);
- ``head``: ``k`` chunks per KV head, each scored by the mass of that head's query group (records
  would then be split per KV head: the same bytes, ``k`` chunk-heads per head);
- ``estimate``: the ``layer`` set, and every other chunk stands in by its mean value, attended with
  its tokens' exact keys (the ceiling of approximating what is not read instead of dropping it:
  a deployment would store a mean value per chunk, 1/16 of the values, and score with its
  identification keys).

Greedy decoding continues with the same per-layer selection. Reported per mode and budget: answers
kept against the full-KV answer, and first-token agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from contiguouskv.bench.quality import _query
from contiguouskv.bench.quality_tasks import TASKS, make_cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a real model with a tokenizer")
    parser.add_argument("--lengths", default="2048", help="approximate prefix tokens, comma-separated")
    parser.add_argument("--cases", type=int, default=14, help="cases per length (default 14)")
    parser.add_argument("--budgets", default="0.05,0.1", help="comma-separated fractions of the prefix's chunks")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the task generator (default 0)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)")
    parser.add_argument("--modes", default="layer,head",
                        help="selections to compare: layer (one set per layer, mass summed over query tokens), head "
                        "(one set per KV head), estimate (the layer set; other chunks by their mean value), last (one set per layer from the last query token's attention), max "
                        "(per chunk the largest mass any query token puts on it) (default layer,head)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default all)")
    parser.add_argument("--json", dest="json_path", type=Path, help="write results as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch  # optional: the compute extra

    from contiguouskv.compute_server.config import default_cache_dir  # optional: the compute extra
    from contiguouskv.compute_server.model.loading import load_model  # optional: the compute extra
    from contiguouskv.compute_server.model.runner import ModelRunner  # optional: the compute extra

    torch.set_grad_enabled(False)
    loaded = load_model(args.model, cache_dir=default_cache_dir(), dtype=torch.float32)
    runner, tok = ModelRunner(loaded), loaded.tokenizer
    cases = make_cases([int(x) for x in args.lengths.split(",")], args.cases, args.seed, args.tasks.split(","))
    modes = args.modes.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    results: dict[tuple[str, float], list[tuple[bool, bool, bool]]] = {}
    start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        prefix = tok(case.prefix, add_special_tokens=False)["input_ids"]
        query = tok(_query(case.question), add_special_tokens=False)["input_ids"]
        pre = runner.prefill(torch.tensor(prefix))
        full_ids = _answer(runner, pre, prefix, query, None, args.new_tokens)
        full_right = case.correct(tok.decode(full_ids))
        for budget in budgets:
            for mode in modes:
                ids = _answer(runner, pre, prefix, query, (mode, budget), args.new_tokens)
                results.setdefault((mode, budget), []).append(
                    (full_right, case.correct(tok.decode(ids)), ids[:1] == full_ids[:1]))
        print(f"[perhead {i}/{len(cases)}] {case.task} {len(prefix)} tokens: full "
              f"{'right' if full_right else 'wrong'} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for (mode, budget), v in sorted(results.items()):
        kept = [right for full_right, right, _ in v if full_right]
        rows.append({"mode": mode, "budget": budget, "n": len(v), "full_right": len(kept),
                     "answers_kept": round(sum(kept) / len(kept), 4) if kept else None,
                     "accuracy": round(sum(r for _, r, _ in v) / len(v), 4),
                     "top1_agreement": round(sum(t for _, _, t in v) / len(v), 4)})
        print(f"{mode:<6}{budget:>6.2f}  n={len(v)}  kept {sum(kept)}/{len(kept)}  "
              f"top1 {rows[-1]['top1_agreement']:.2f}")
    if args.json_path:
        args.json_path.write_text(json.dumps({"model": args.model, "cases": len(cases), "results": rows}, indent=2))
    return 0


def _answer(runner: object, pre: object, prefix: list[int], query: list[int], select: tuple[str, float] | None,
            new_tokens: int) -> list[int]:
    """Greedy tokens of prefix + query; ``select`` = (mode, budget) keeps an exact top-k of chunks
    per layer (``layer``) or per KV head (``head``) chosen from the query's attention."""
    import torch  # optional: the compute extra

    r = runner
    n, c = len(prefix), 16
    m = -(-n // c)
    masks: list[torch.Tensor] = []  # per layer: bool [kv_heads, n], True = kept
    ids = list(query)
    out: list[int] = []
    cache_k = [k for k in pre.keys]  # type: ignore[attr-defined]
    cache_v = [v for v in pre.values]  # type: ignore[attr-defined]
    for step in range(new_tokens + 1):
        tokens = ids if step == 0 else ids[-1:]
        pos = torch.arange(n + len(ids) - len(tokens), n + len(ids))
        hidden = r.embed(torch.tensor(tokens))  # type: ignore[attr-defined]
        for layer in range(r.num_layers):  # type: ignore[attr-defined]
            q, k, v = r.project(layer, hidden, pos)  # type: ignore[attr-defined]
            heads, kvh = q.shape[0], k.shape[0]
            g = heads // kvh
            keys = torch.cat([cache_k[layer], k], dim=1)
            values = torch.cat([cache_v[layer], v], dim=1)
            cache_k[layer], cache_v[layer] = keys, values
            total = keys.shape[1]
            logits = q @ keys.repeat_interleave(g, dim=0).transpose(1, 2) * r.scaling  # type: ignore[attr-defined]
            t = len(tokens)
            causal = torch.arange(total)[None, :] > (torch.arange(total - t, total))[:, None]  # [t, total]
            logits = logits.masked_fill(causal, float("-inf"))
            if select is not None:
                if step == 0:
                    masks.append(_choose(torch.softmax(logits, dim=-1)[:, :, :n], select, kvh, g, n, m, c))
                if select[0] == "estimate":
                    if step == 0:  # once: later steps append to the cached, stood-in values
                        values = cache_v[layer] = _stand_in(values, masks[layer], n, c)
                else:
                    hide = torch.ones(kvh, total, dtype=torch.bool)
                    hide[:, :n] = ~masks[layer]
                    hide[:, n:] = False
                    logits = logits.masked_fill(hide.repeat_interleave(g, dim=0)[:, None, :], float("-inf"))
            att = torch.softmax(logits, dim=-1) @ values.repeat_interleave(g, dim=0)  # [heads, t, d]
            hidden = r.finish(layer, hidden, att.transpose(0, 1).reshape(t, -1))  # type: ignore[attr-defined]
        token = int(r.logits(hidden[-1:])[0].argmax())  # type: ignore[attr-defined]
        out.append(token)
        ids.append(token)
    return out


def _stand_in(values: object, keep: object, n: int, c: int) -> object:
    """``values`` [kv_heads, T, d] with every prefix token outside ``keep`` [kv_heads, n] replaced
    by the mean value of its chunk (per KV head); kept and query tokens unchanged (a copy)."""
    import torch  # optional: the compute extra

    from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout  # optional: the compute extra
    from contiguouskv.compute_server.layouts.contiguous_codec import chunk_digest  # optional: the compute extra

    kvh, _, d = values.shape  # type: ignore[attr-defined]
    layout = ContiguousLayout(n, 1, kvh, d, "float32", chunk_size=c)
    means = chunk_digest(layout, values[:, :n]).transpose(0, 1)  # type: ignore[index]  # [kv_heads, m, d]
    means = means.repeat_interleave(c, dim=1)[:, :n].to(values.dtype)  # type: ignore[attr-defined]
    out = values.clone()  # type: ignore[attr-defined]
    out[:, :n] = torch.where(keep[:, :, None], values[:, :n], means)  # type: ignore[index]
    return out


def _choose(probs: object, select: tuple[str, float], kvh: int, g: int, n: int, m: int, c: int) -> object:
    """Kept prefix tokens [kv_heads, n] from the query's attention over the prefix [heads, T, n]."""
    import torch  # optional: the compute extra

    mode, budget = select
    k = min(m, max(math.ceil(budget * m - 1e-9), 2))
    if mode == "last":
        probs = probs[:, -1:]  # type: ignore[index]
    if mode == "max":  # per query token and head: mass per chunk; then the largest over tokens, summed over heads
        t = probs.shape[1]  # type: ignore[attr-defined]
        per = torch.nn.functional.pad(probs, (0, m * c - n)).view(kvh * g, t, m, c).sum(dim=3)  # [H, T, m]
        best = per.amax(dim=1).view(kvh, g, m).sum(dim=(0, 1))  # [m]
        per_head = best.expand(kvh, m)
    else:
        mass = torch.nn.functional.pad(probs.sum(dim=1), (0, m * c - n))  # type: ignore[attr-defined]
        per_head = mass.view(kvh, g, m, c).sum(dim=(1, 3))  # [kv_heads, m]
    scores = per_head if mode == "head" else per_head.sum(dim=0, keepdim=True).expand(kvh, m)
    scores = scores.clone()
    scores[:, 0] = scores[:, -1] = float("inf")  # the sink and the last chunk, as the policies do
    top = scores.topk(k, dim=1).indices  # [kv_heads, k]
    keep = torch.zeros(kvh, m, dtype=torch.bool)
    keep.scatter_(1, top, True)
    return keep.repeat_interleave(c, dim=1)[:, :n]
