"""``contiguouskv bench quality``: answers and next-token agreement of every policy on a real model.

Cases are generated from fixed seeds, not picked: needle-in-a-haystack and passkey retrieval over
the Paul Graham essays at several depths and lengths, a multi-needle variant, and retrieval of a
constant planted in Python standard-library source code. Each case is registered once; every policy
and budget answers it greedily; we score exact match (the expected string appears in the answer),
top-1 agreement of the first token with `full`, and KL(full || policy) of the first-token
distribution.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from contiguouskv import launch
from contiguouskv.bench.policies import PRIMARY_LAYOUT, cells, extra_layouts, resolve
from contiguouskv.client import ContiguousKVClient, PolicyInfo
from contiguouskv.demo import essay_dir

WORDS = ("amber", "falcon", "cobalt", "maple", "orbit", "quartz", "saffron", "tundra", "velvet", "zephyr")


@dataclass(frozen=True)
class Case:
    task: str
    prefix: str
    question: str
    answer: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a real model with a tokenizer")
    parser.add_argument("--lengths", default="2048,4096", help="approximate prefix tokens, comma-separated")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in the haystack")
    parser.add_argument("--budgets", default="0.05,0.1,0.25,0.5", help="comma-separated fractions of the prefix")
    parser.add_argument("--policies", default="all",
                        help="comma-separated policies (default all: every policy the server serves that loads KV)")
    parser.add_argument("--tasks", default="needle,passkey,multi_needle,code",
                        help="comma-separated tasks (default needle,passkey,multi_needle,code)")
    parser.add_argument("--dtype", default="bfloat16", help="compute/KV dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the task generator (default 0)")
    parser.add_argument("--period", type=int,
                        help="layers per period for the selective chunk policies (default: each policy's own)")
    parser.add_argument("--json", dest="json_path", type=Path, help="write results as JSON here")


def _chat(docs: str) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant. Answer with the exact value only.<|im_end|>\n"
            f"<|im_start|>user\n{docs}")


def _query(question: str) -> str:
    return f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"


def _haystack(chars: int, rng: random.Random) -> str:
    files = sorted(essay_dir().glob("*.txt"))
    rng.shuffle(files)
    text = ""
    for f in files:
        if len(text) >= chars:
            break
        text += f.read_text() + "\n\n"
    return text[:chars]


def _insert(text: str, depth: float, sentence: str) -> str:
    cut = text.rfind(". ", 0, int(len(text) * depth)) + 2 or int(len(text) * depth)
    return text[:cut] + sentence + " " + text[cut:]


def _code(chars: int, rng: random.Random) -> str:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = ""
    while len(text) < chars:
        text += f"# file: {rng.choice(files).name}\n" + rng.choice(files).read_text(errors="replace")[:6000] + "\n"
    return text[:chars]


def make_cases(tasks: list[str], lengths: list[int], depths: list[float], seed: int) -> list[Case]:
    """Cases from the seed alone: same arguments, same cases."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        chars = int(length * 3.6)  # about 3.6 characters per token of English prose for these tokenizers
        for depth in depths:
            key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randrange(10, 99)}"
            if "needle" in tasks:
                hay = _insert(_haystack(chars, rng), depth, f"The secret passphrase is {key}.")
                out.append(Case("needle", _chat(hay), "What is the secret passphrase?", key))
            if "passkey" in tasks:
                code = str(rng.randrange(10000, 99999))
                hay = _insert(_haystack(chars, rng), depth, f"The pass key is {code}. Remember it. {code} is the pass key.")
                out.append(Case("passkey", _chat(hay), "What is the pass key?", code))
            if "multi_needle" in tasks:
                doors = {c: str(rng.randrange(100, 999)) for c in ("red", "green", "blue")}
                hay = _haystack(chars, rng)
                for i, (color, num) in enumerate(doors.items()):
                    hay = _insert(hay, (depth + i / 3) % 1.0, f"The code for the {color} door is {num}.")
                color = rng.choice(sorted(doors))
                out.append(Case("multi_needle", _chat(hay), f"What is the code for the {color} door?", doors[color]))
            if "code" in tasks:
                value = str(rng.randrange(1000, 9999))
                src = _insert(_code(chars, rng), depth, f"\nCKV_RETRY_BUDGET_MS = {value}\n")
                out.append(Case("code", _chat(f"Source code:\n{src}"),
                                "What is the value of CKV_RETRY_BUDGET_MS in the source code?", value))
    return out


def _kl(p_logits: tuple[float, ...], q_logits: tuple[float, ...]) -> float:
    import torch  # optional: the compute extra

    p = torch.log_softmax(torch.tensor(p_logits), dim=-1)
    q = torch.log_softmax(torch.tensor(q_logits), dim=-1)
    return float((p.exp() * (p - q)).sum())


def run(args: argparse.Namespace) -> int:
    tasks = args.tasks.split(",")
    cases = make_cases(tasks, [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")],
                       args.seed)
    budgets = [float(b) for b in args.budgets.split(",")]
    scores: dict[tuple[str, float, str], list[tuple[bool, bool, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ckv-quality-", dir=Path.cwd()) as tmp:
        with launch.cache_server(Path(tmp) / "store", "--dram-cache-bytes", "0") as cache:
            compute = launch.compute_server(args.model, cache.address, "--dtype", args.dtype)  # greedy: any thread count
            with compute:
                compute.wait_ready(timeout=900)
                with ContiguousKVClient(compute.address, timeout=3600) as client:
                    info = client.model_info()
                    chosen = resolve(args.policies, info, skip=[p.name for p in info.policy_info if not p.loads_kv])
                    reference = [p for p in info.policy_info if p.loads_kv and not p.selective][:1]  # full KV
                    policies = reference + [p for p in chosen if p not in reference]
                    periodic = {p.name for p in policies if p.selective and p.layout == PRIMARY_LAYOUT}
                    for i, case in enumerate(cases, 1):
                        _case(client, case, policies, budgets, periodic, scores, i, len(cases), args.period)
    results = [{"policy": p, "budget": b, "task": t, "n": len(v), "accuracy": sum(a for a, _, _ in v) / len(v),
                "top1_agreement": sum(t1 for _, t1, _ in v) / len(v), "kl": sum(k for _, _, k in v) / len(v)}
               for (p, b, t), v in scores.items()]
    _print(results)
    if args.json_path:
        args.json_path.write_text(json.dumps({"model": args.model, "cases": len(cases), "results": results}, indent=2))
    return 0


def _case(client: ContiguousKVClient, case: Case, policies: list[PolicyInfo], budgets: list[float],
          periodic: set[str], scores: dict[tuple[str, float, str], list[tuple[bool, bool, float]]], i: int, total: int,
          period: int | None = None) -> None:
    """One case through every (policy, budget); the first policy (full KV) is the reference."""
    extra = extra_layouts(policies)
    start = time.perf_counter()
    reg = client.register(case.prefix, extra_layouts=extra) if extra else client.register(case.prefix)
    reference = None
    for policy, budget in cells(policies, budgets):
        r = client.reprefill(reg.prefix_id, _query(case.question), policy=policy, budget=budget,
                             max_new_tokens=16, return_logits=True,
                             period=period if policy in periodic else None,
                             sub_period=1 if period == 1 and policy in periodic else None)
        reference = reference or r
        correct = case.answer.lower() in r.answer.lower()
        scores.setdefault((policy, budget, case.task), []).append(
            (correct, r.token_id == reference.token_id, _kl(reference.logits, r.logits)))
    print(f"[quality {i}/{total}] {case.task} {reg.num_tokens} tokens: full answered "
          f"{'right' if case.answer.lower() in reference.answer.lower() else 'wrong'} "  # type: ignore[union-attr]
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def _print(results: list[dict[str, object]]) -> None:
    print(f"{'policy':<12}{'budget':>7} {'task':<13}{'n':>3}{'exact':>7}{'top1':>7}{'KL':>9}")
    for r in sorted(results, key=lambda r: (r["task"], r["policy"], r["budget"])):  # type: ignore[arg-type, return-value]
        print(f"{r['policy']:<12}{r['budget']:>7.2f} {r['task']:<13}{r['n']:>3}{r['accuracy']:>7.2f}"
              f"{r['top1_agreement']:>7.2f}{r['kl']:>9.4f}")
    overall: dict[tuple[str, float], list[float]] = {}
    for r in results:
        overall.setdefault((r["policy"], r["budget"]), []).append(r["accuracy"])  # type: ignore[arg-type]
    print("exact match over all tasks: " + ", ".join(
        f"{p}@{b:g} {sum(v) / len(v):.2f}" for (p, b), v in sorted(overall.items())))
