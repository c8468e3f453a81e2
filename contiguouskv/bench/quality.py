"""``contiguouskv bench quality``: answers kept and bytes read of every policy on a real model.

Cases come from :mod:`.quality_tasks` (seven long-context retrieval tasks over the essays and the
standard library, generated from a seed). Up to ``--per-prefix`` questions share one prefix (their
plants are distractors for each other), registered once: its full prefill is most of a run's
time. For every question `full` answers (the reference), and every (policy, budget) answers it
greedily with ``evaluate_recall`` (the server scores every layer exactly as well, from all keys, and reports how much of the exact top-k
chunk set and of its attention mass the policy's choice covered; those evaluation reads are not
counted). Per (policy, budget, prefix length) the bench reports:

- ``accuracy`` — every expected value in the answer; ``answers_kept`` — of the cases `full`
  answered right, the fraction this policy answered right too;
- ``top1_agreement`` and ``kl`` — first token against `full`'s, KL(full || policy) of its distribution;
- ``oracle_recall`` / ``oracle_mass_recall`` — chunk-level policies only;
- ``bytes_read_pct`` — identification + K/V (cancelled predictions that were sent included) as a
  percentage of `full`'s K/V, cold: the compute server runs without its identification cache, so
  every request reads its identification data; ``bytes_read_warm_pct`` — the same request on a
  prefix whose identification data is resident (the K/V part alone: a warm request reads no
  identification data and selects the same chunks, tests/test_contiguous.py);
- ``ident_wait_ms``, ``ttft_ms`` and ``total_ms`` (the whole request, greedy answer included) —
  means (timings on a shared CPU are indicative only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contiguouskv import launch
from contiguouskv.bench.policies import cells, extra_layouts, resolve
from contiguouskv.bench.quality_tasks import TASKS, Case, make_cases
from contiguouskv.client import ContiguousKVClient, ModelInfo, ReprefillResult

DEFAULT_POLICIES = "oracle,contiguous+"  # the ceiling and the default; --policies all for the rest
PER_PREFIX = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                        help="a real model with a tokenizer (qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct)")
    parser.add_argument("--lengths", default="2048,4096",
                        help="approximate prefix tokens, comma-separated (up to 32768 for Qwen)")
    parser.add_argument("--cases", type=int, default=30, help="cases per length (default 30; tasks round-robin)")
    parser.add_argument("--budgets", default="0.05,0.1", help="comma-separated fractions of the prefix")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated policies besides full, or all (default {DEFAULT_POLICIES})")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default all seven)")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype (default float32: several times faster than bfloat16 on CPUs without "
                        "bfloat16 instructions)")
    parser.add_argument("--kv-dtype", default="bfloat16",
                        help="stored KV dtype (default bfloat16, what a deployment stores; byte shares refer to it)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the task generator (default 0)")
    parser.add_argument("--per-prefix", type=int, default=PER_PREFIX,
                        help=f"questions asked of one prefix, of different tasks unless the question names its key "
                        f"(default {PER_PREFIX}; 1: one prefix per case). Registering a prefix is its full prefill, most of a run's time")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="requests of one question in flight at once (default 0: all its (policy, budget) cells; "
                        "1: one at a time). The compute server batches concurrent requests' layer passes; the answers "
                        "are the same either way, and on a 2-core CPU the run is only slightly faster")
    parser.add_argument("--json", dest="json_path", type=Path, help="write results as JSON here")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="instead of running: merge the JSON of runs over the same cases (same seed, lengths, "
                        "cases; `full` must agree) into --json, with rows over all lengths added")


def _query(question: str) -> str:
    return f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"


def _new_tokens(case: Case) -> int:
    """Enough greedy tokens for the expected values (about 2.5 characters a token) and some slack."""
    return min(48, 6 + len(", ".join(case.expected)) * 2 // 5)


def _kl(p_logits: tuple[float, ...], q_logits: tuple[float, ...]) -> float:
    import torch  # optional: the compute extra

    p = torch.log_softmax(torch.tensor(p_logits), dim=-1)
    q = torch.log_softmax(torch.tensor(q_logits), dim=-1)
    return float((p.exp() * (p - q)).sum())


@dataclass
class Cell:
    """What one (policy, budget, length) did over its cases."""

    correct: list[bool] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)  # over the cases full answered right
    top1: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    mass_recall: list[float] = field(default_factory=list)
    read_pct: list[float] = field(default_factory=list)
    ident_pct: list[float] = field(default_factory=list)
    warm_pct: list[float] = field(default_factory=list)
    ident_wait_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    tasks: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, case: Case, r: ReprefillResult, full: ReprefillResult, full_right: bool) -> None:
        right = case.correct(r.answer)
        self.correct.append(right)
        self.tasks.setdefault(case.task, []).append(right)
        if full_right:
            self.kept.append(right)
        self.top1.append(r.token_id == full.token_id)
        self.kl.append(_kl(full.logits, r.logits))
        if r.recall >= 0:
            self.recall.append(r.recall)
            self.mass_recall.append(r.mass_recall)
        base = full.bytes_kv or 1
        self.read_pct.append(100.0 * (r.bytes_identification + r.bytes_kv) / base)
        self.ident_pct.append(100.0 * r.bytes_identification / base)
        self.warm_pct.append(100.0 * r.bytes_kv / base)
        self.ident_wait_ms.append(sum(t.ident_wait_ms for t in r.timings.layers))
        self.ttft_ms.append(r.timings.ttft_ms)
        self.total_ms.append(r.timings.total_ms)

    def row(self, policy: str, budget: float, length: int, tokens: list[int]) -> dict[str, object]:
        def mean(v: list[float] | list[bool]) -> float | None:
            return round(sum(v) / len(v), 4) if v else None

        return {"policy": policy, "budget": budget, "prefix_tokens": round(sum(tokens) / len(tokens)),
                "length": length, "n": len(self.correct), "accuracy": mean(self.correct),
                "answers_kept": mean(self.kept), "kept_of": len(self.kept), "top1_agreement": mean(self.top1),
                "kl": mean(self.kl), "oracle_recall": mean(self.recall), "oracle_mass_recall": mean(self.mass_recall),
                "bytes_read_pct": mean(self.read_pct), "ident_pct": mean(self.ident_pct),
                "bytes_read_warm_pct": mean(self.warm_pct), "ident_wait_ms": mean(self.ident_wait_ms),
                "ttft_ms": mean(self.ttft_ms), "total_ms": mean(self.total_ms),
                "tasks": {t: mean(v) for t, v in sorted(self.tasks.items())}}


def run(args: argparse.Namespace) -> int:
    if args.merge:
        return merge(args.merge, args.json_path)
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = make_cases(lengths, args.cases, args.seed, [t.strip() for t in args.tasks.split(",")], args.per_prefix)
    budgets = [float(b) for b in args.budgets.split(",")]
    table: dict[tuple[str, float, int], Cell] = {}
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckv-quality-", dir=Path.cwd()) as tmp:
        with launch.cache_server(Path(tmp) / "store", "--dram-cache-bytes", "0") as cache:
            compute = launch.compute_server(args.model, cache.address, "--dtype", args.dtype, "--kv-dtype",
                                            args.kv_dtype, "--ident-cache-bytes", "0")  # cold identification for every request
            with compute:
                compute.wait_ready(timeout=900)
                with ContiguousKVClient(compute.address, timeout=3600) as client:
                    info = client.model_info()
                    reference = [p for p in info.policy_info if p.loads_kv and not p.selective][:1]  # full KV
                    chosen = resolve(args.policies, info, skip=[p.name for p in info.policy_info if not p.loads_kv])
                    policies = reference + [p for p in chosen if p not in reference]
                    extra = extra_layouts(policies)
                    done = 0
                    groups = _by_prefix(cases)
                    for group in groups:
                        reg = client.register(group[0].prefix, extra_layouts=extra) if extra else client.register(
                            group[0].prefix)
                        for case in group:
                            done += 1
                            tokens.setdefault(case.prefix_tokens_target, []).append(reg.num_tokens)
                            full_right = _answer_case(client, reg.prefix_id, case, policies, budgets, reference[0].name,
                                                      table, args.concurrency)
                            elapsed = time.perf_counter() - start
                            print(f"[quality {done}/{len(cases)}] {case.task} {reg.num_tokens} tokens, depth "
                                  f"{case.depth:.2f}: full {'right' if full_right else 'wrong'}; {elapsed:.0f} s, "
                                  f"~{elapsed / done * (len(cases) - done):.0f} s left", file=sys.stderr, flush=True)
                            if args.json_path:  # after every case: a long run's partial results stay usable
                                _write(args, done, len(groups), lengths, budgets, table, tokens, start,
                                       finished=done == len(cases), info=info)
    _print(_rows(table, tokens))
    return 0


def _by_prefix(cases: list[Case]) -> list[list[Case]]:
    """The cases grouped by their prefix, in order of each prefix's first case."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.prefix, []).append(case)
    return list(groups.values())


def _answer_case(client: ContiguousKVClient, prefix_id: str, case: Case, policies: list[Any], budgets: list[float],
                 reference: str, table: dict[tuple[str, float, int], Cell], concurrency: int) -> bool:
    """Every (policy, budget) answers ``case``, up to ``concurrency`` requests at once (0: all);
    returns whether the reference (full KV) was right."""
    todo = list(cells(policies, budgets))

    def ask(cell: tuple[str, float]) -> ReprefillResult:
        policy, budget = cell
        return client.reprefill(prefix_id, _query(case.question), policy=policy, budget=budget,
                                max_new_tokens=_new_tokens(case), return_logits=True,
                                evaluate_recall=policy != reference)

    with ThreadPoolExecutor(max_workers=concurrency or len(todo)) as pool:
        results = list(pool.map(ask, todo))
    full = results[0]  # cells() puts the reference first
    full_right = case.correct(full.answer)
    for (policy, budget), r in zip(todo, results, strict=True):
        table.setdefault((policy, budget, case.prefix_tokens_target), Cell()).add(case, r, full, full_right)
    return full_right


def _rows(table: dict[tuple[str, float, int], Cell], tokens: dict[int, list[int]]) -> list[dict[str, object]]:
    rows = [cell.row(p, b, length, tokens[length]) for (p, b, length), cell in table.items()]
    return rows + overall(rows)


AVERAGED = ("accuracy", "top1_agreement", "kl", "oracle_recall", "oracle_mass_recall", "bytes_read_pct", "ident_pct",
            "bytes_read_warm_pct", "ident_wait_ms", "ttft_ms", "total_ms", "prefix_tokens")


def overall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows over every length (``length`` 0) per (policy, budget), from the per-length rows: means
    weighted by cases, ``answers_kept`` over all the cases `full` answered right."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["length"]:
            groups.setdefault((r["policy"], r["budget"]), []).append(r)
    out = []
    for (policy, budget), parts in groups.items():
        n = sum(r["n"] for r in parts)
        kept_of = sum(r["kept_of"] for r in parts)
        row: dict[str, Any] = {"policy": policy, "budget": budget, "length": 0, "n": n, "kept_of": kept_of,
                               "answers_kept": round(sum(r["answers_kept"] * r["kept_of"] for r in parts if r["kept_of"])
                                                     / kept_of, 4) if kept_of else None}
        for key in AVERAGED:
            have = [r for r in parts if r.get(key) is not None]  # runs older than a key lack it
            row[key] = round(sum(r[key] * r["n"] for r in have) / sum(r["n"] for r in have), 4) if have else None
        row["prefix_tokens"] = round(row["prefix_tokens"]) if row["prefix_tokens"] is not None else None
        out.append(row)
    return out


def merge(paths: list[Path], out: Path | None) -> int:
    """One JSON from several runs over the same cases (different policies); `full` rows must agree."""
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    for other, path in zip(runs[1:], paths[1:]):
        for key in ("model", "seed", "lengths", "cases", "dtype", "kv_dtype", "per_prefix"):
            if other.get(key, 1 if key == "per_prefix" else None) != first.get(key, 1 if key == "per_prefix" else None):
                raise SystemExit(f"{path}: {key} {other.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}")
    rows: dict[tuple[str, float, int], dict[str, Any]] = {}
    for run in runs:
        for r in run["results"]:
            if not r["length"]:
                continue
            where = (r["policy"], r["budget"], r["length"])
            if where in rows and r["policy"] == "full" and rows[where]["accuracy"] != r["accuracy"]:
                raise SystemExit(f"full answered differently across runs at length {r['length']}")
            rows.setdefault(where, r)
    merged = {**{k: v for k, v in first.items() if k != "results"}, "merged_from": [p.name for p in paths],
              "wall_s": sum(run.get("wall_s", 0) for run in runs), "complete": all(run.get("complete", True)
                                                                                  for run in runs)}
    merged["results"] = list(rows.values()) + overall(list(rows.values()))
    _print(merged["results"])
    if out is not None:
        out.write_text(json.dumps(merged, indent=2))
    return 0


def _write(args: argparse.Namespace, cases: int, prefixes: int, lengths: list[int], budgets: list[float],
           table: dict[tuple[str, float, int], Cell], tokens: dict[int, list[int]], start: float, finished: bool,
           info: ModelInfo) -> None:
    args.json_path.write_text(json.dumps({
        "model": args.model, "dtype": args.dtype, "kv_dtype": args.kv_dtype, "score_dtype": info.score_dtype,
        "score_heads": info.score_heads, "score_window": info.score_window, "cases": cases, "seed": args.seed,
        "per_prefix": args.per_prefix, "prefixes": prefixes, "complete": finished, "lengths": lengths, "budgets": budgets, "wall_s": round(time.perf_counter() - start, 1),
        "results": _rows(table, tokens)}, indent=2))


def _print(rows: list[dict[str, object]]) -> None:
    print(f"{'policy':<19}{'budget':>7}{'tokens':>7}{'n':>4}{'acc':>6}{'kept':>6}{'top1':>6}{'KL':>8}"
          f"{'recall':>7}{'mass':>6}{'read%':>7}{'warm%':>7}{'idwait':>8}")

    def fmt(v: object, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0])

    if len({r["length"] for r in rows if r["length"] is not None}) == 1:  # the all-lengths rows repeat it
        rows = [r for r in rows if r["length"] is not None]

    for r in sorted(rows, key=lambda r: (r["length"] or 1 << 30, r["policy"] != "full", r["policy"], r["budget"])):  # type: ignore[return-value]
        print(f"{r['policy']:<19}{r['budget']:>7.2f}{r['prefix_tokens']:>7}{r['n']:>4}{fmt(r['accuracy'], '6.2f')}"
              f"{fmt(r['answers_kept'], '6.2f')}{fmt(r['top1_agreement'], '6.2f')}{fmt(r['kl'], '8.4f')}"
              f"{fmt(r['oracle_recall'], '7.2f')}{fmt(r['oracle_mass_recall'], '6.2f')}"
              f"{fmt(r['bytes_read_pct'], '7.1f')}{fmt(r['bytes_read_warm_pct'], '7.1f')}"
              f"{fmt(r['ident_wait_ms'], '8.1f')}")
