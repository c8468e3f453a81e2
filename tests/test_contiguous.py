"""The `contiguous` policies against an independent, materialised reference.

The reference runs the same algorithm with plain full attention matrices: at each period's first
layer it takes softmax(q K^T) over [prefix ; query] (causal on the query part), sums the prefix
columns over heads and query rows, per chunk, keeps the top ceil(budget x m) with the first and last
chunk, and then attends only to the kept chunks' tokens. The served result must select the same
chunks and give the same logits — so mispredicted chunks were fetched before use. It runs against a
server scoring in float32 and one scoring in bfloat16 (``--score-dtype``); for the second the
reference rounds the scaled query, the keys and the q.k products to bfloat16 where the server does.
Both run the speculation on the server's look-ahead thread; a third server (float32) runs it on
the request's thread (``--look-ahead-threads 0``): the results must not depend on which. The third
also combines the query heads by the largest head's mass (``--score-heads max``) and scores with
the query's last 3 tokens (``--score-window 3``) in the policies that follow those settings, and
its reference does the same.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch

from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient, InvalidArgumentError
from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.policies.identified import IdentifiedPolicy
from contiguouskv.compute_server.policies.registry import BUILTIN_POLICIES
from contiguouskv.compute_server.selection.keyquant import dequantize_keys, quantize_keys
from test_compute_metrics import scrape

MODEL = "random:tiny"
C = 16


class Rule(NamedTuple):
    """A server's ``--score-heads`` and ``--score-window``."""

    heads: str = "sum"
    window: int = 0


@pytest.fixture(scope="module", params=[("float32", 1, "sum", 0), ("bfloat16", 1, "sum", 0),
                                        ("float32", 0, "max", 3)],
                ids=["float32", "bfloat16", "float32-inline-headmax-window3"])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ContiguousKVClient, str, Rule]]:
    """A client of a server scoring in ``float32`` or ``bfloat16``, with or without a look-ahead
    thread, combining heads by ``sum`` or ``max`` (``--score-heads``) over the query's last
    ``--score-window`` tokens; its scoring dtype and rule."""
    score_dtype, ahead, heads, window = request.param
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server(MODEL, cache.address, "--dtype", "float32", "--score-dtype", score_dtype,
                                   "--look-ahead-threads", str(ahead), "--score-heads", heads,
                                   "--score-window", str(window), "--metrics-port", "0") as compute:
            found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", compute.log_tail(200))
            assert found, compute.log_tail()
            METRICS[score_dtype, ahead] = found.group(1)
            with ContiguousKVClient(compute.address, timeout=120) as c:
                yield c, score_dtype, Rule(heads, window)


METRICS: dict[tuple[str, int], str] = {}  # (score dtype, look-ahead threads) -> the server's metrics URL


@pytest.fixture
def client(served: tuple[ContiguousKVClient, str, Rule]) -> ContiguousKVClient:
    return served[0]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(load_model(MODEL, cache_dir=default_cache_dir()))


def _top(scores: list[float], budget: float) -> list[int]:
    m = len(scores)
    k = min(m, max(math.ceil(budget * m - 1e-9), min(2, m)))
    forced = {0, m - 1}
    rest = sorted((j for j in range(m) if j not in forced), key=lambda j: (-scores[j], j))
    return sorted(forced | set(rest[: max(0, k - len(forced))]))


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[0], dim=0)


def _chunk_sums(token_mass: torch.Tensor, n: int) -> list[float]:
    return [float(token_mass[s : min(s + C, n)].sum()) for s in range(0, n, C)]


def _combine(per_head: list[list[float]], rule: str) -> list[float]:
    """Each chunk's score from every head's mass on it: summed, or the largest."""
    return [sum(c) if rule == "sum" else max(c) for c in zip(*per_head)]


def _quantized(keys: torch.Tensor, low: bool, group: int = 64, bits: int = 2) -> torch.Tensor:
    """Keys [kv_heads, n, d] through 2-bit per-channel quantisation over 64-token groups, written
    independently of the server's packer: float16 min and step per group, round to nearest level.
    ``low``: decoded as a bfloat16 scorer does (min and step in bfloat16, the key rounded to it)."""
    out = torch.empty_like(keys, dtype=torch.float32)
    for a in range(0, keys.shape[1], group):
        g = keys[:, a : a + group].float()
        lo = g.amin(dim=1, keepdim=True).half().float()
        step = ((g.amax(dim=1, keepdim=True) - lo) / (2**bits - 1)).half().float()
        codes = torch.where(step > 0, torch.round((g - lo) / torch.where(step > 0, step, 1.0)), 0.0).clamp(0, 3)
        if low:
            lo, step = lo.bfloat16().float(), step.bfloat16().float()
        out[:, a : a + group] = lo + codes * step
    return out.bfloat16().float() if low else out


def _products(qs: torch.Tensor, keys: torch.Tensor, heads: int, scale: float, low: bool) -> torch.Tensor:
    """Scaled q.k [H, T, n]; ``low``: as the bfloat16 scorer forms them (the scaled query and the keys
    in bfloat16, each product rounded to bfloat16 once)."""
    if not low:
        return qs @ _expand(keys, heads).transpose(1, 2) * scale
    q16 = (qs * scale).bfloat16().double()
    return (q16 @ _expand(keys.bfloat16().double(), heads).transpose(1, 2)).bfloat16().float()


def _scores(method: str, runner: ModelRunner, layer_keys: torch.Tensor, qs: torch.Tensor, ks: torch.Tensor,
            n: int, budget: float, low: bool = False, rule: str = "sum") -> list[float]:
    """Chunk scores of one layer by ``method``, every product materialised (``low``: the q.k
    products of the key scorers as a bfloat16 scorer forms them). The key and Quest scorers combine
    heads by ``rule``."""
    heads, w, t = runner.num_heads, qs.shape[1], ks.shape[1]  # qs: the query's last w tokens
    causal = torch.ones(w, t, dtype=torch.bool).triu(t - w + 1)
    self_logits = (qs @ _expand(ks, heads).transpose(1, 2) * runner.scaling).masked_fill(causal, -torch.inf)
    bounds = [(s, min(s + C, n)) for s in range(0, n, C)]
    counts = torch.tensor([b - a for a, b in bounds], dtype=torch.float32)
    if method == "digest":  # digest shortlist of 3k chunks, then exact mass for the shortlist
        means = torch.stack([layer_keys[:, a:b].mean(dim=1) for a, b in bounds], dim=1)
        pl = qs @ _expand(means, heads).transpose(1, 2) * runner.scaling + counts.log()
        probs = torch.softmax(torch.cat([pl, self_logits], dim=-1), dim=-1)
        rough = probs[:, :, : means.shape[1]].sum(dim=(0, 1)).tolist()
        short = _top(rough, max(budget, min(0.5, 3 * budget)))
        tokens = [tok for j in short for tok in range(*bounds[j])]
        exact = qs @ _expand(layer_keys[:, tokens], heads).transpose(1, 2) * runner.scaling
        rest = [j for j in range(len(bounds)) if j not in short]
        probs = torch.softmax(torch.cat([exact, pl[:, :, rest], self_logits], dim=-1), dim=-1)
        mass = probs[:, :, : len(tokens)].sum(dim=(0, 1))
        scores = [0.0] * len(bounds)
        for i, tok in enumerate(tokens):
            scores[tok // C] += float(mass[i])
        return scores
    if method == "quest":  # per chunk: sum over channels of max(q * min, q * max), for every key of it
        lo = torch.stack([layer_keys[:, a:b].amin(dim=1) for a, b in bounds], dim=1)  # [kv_heads, m, d]
        hi = torch.stack([layer_keys[:, a:b].amax(dim=1) for a, b in bounds], dim=1)
        qe = qs[:, :, None, :]  # [H, T, 1, d]
        upper = torch.maximum(qe * _expand(lo, heads)[:, None], qe * _expand(hi, heads)[:, None]).sum(dim=-1)
        pl = upper * runner.scaling + counts.log()
        probs = torch.softmax(torch.cat([pl, self_logits], dim=-1), dim=-1)
        return _combine(probs[:, :, : len(bounds)].sum(dim=1).tolist(), rule)  # per head [H][m]
    if method == "qkeys1":  # the 1-bit least-squares format: its round trip is property-tested on its own
        keys = dequantize_keys(quantize_keys(layer_keys, 1, 128, "lloyd"), n, layer_keys.shape[0],
                               layer_keys.shape[2], 1, 128, dtype=torch.bfloat16 if low else torch.float32).float()
    else:
        keys = _quantized(layer_keys, low) if method == "qkeys" else layer_keys
    pl = _products(qs, keys, heads, runner.scaling, low)
    probs = torch.softmax(torch.cat([pl, self_logits], dim=-1), dim=-1)
    return _combine([_chunk_sums(mass, n) for mass in probs[:, :, :n].sum(dim=1)], rule)  # per head [H][m]


METHODS = {"contiguous": "exact", "oracle": "exact", "contiguous+digest": "digest", "contiguous+": "qkeys",
           "contiguous+quest": "quest", "contiguous+1bit": "qkeys1"}
POLICY_CLASSES = {cls.name: cls for cls in BUILTIN_POLICIES}  # whether each follows --score-heads/--score-window
SPECULATIVE = {"contiguous+", "contiguous+quest", "contiguous+1bit"}  # speculate from the hidden state a layer early, then correct


def reference(runner: ModelRunner, prefix: list[int], query: list[int], budget: float, period: int,
              policy: str, score_dtype: str = "float32",
              rule: Rule = Rule()) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """Selections per period, speculative selections per period (empty when none), and
    last-position logits, with materialised attention. The oracle scores in float32 whatever
    ``score_dtype`` says."""
    method = METHODS[policy]
    low = score_dtype == "bfloat16" and policy != "oracle"
    heads_rule, window = rule if POLICY_CLASSES[policy].follows_score_rule else Rule()
    with torch.inference_mode():
        pre = runner.prefill(torch.tensor(prefix))
        n, t, heads = len(prefix), len(query), runner.num_heads
        pos = torch.arange(n, n + t)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        hidden = runner.embed(torch.tensor(query))
        selections: list[list[int]] = []
        speculated: list[list[int]] = []
        keep = torch.ones(n, dtype=torch.bool)
        entering: list[torch.Tensor] = []
        for layer in range(runner.num_layers):
            entering.append(hidden)
            q, k, v = runner.project(layer, hidden, pos)
            if layer % period == 0:
                qs, ks = (q, k)
                if method == "digest" and layer > 0:  # contiguous+digest: scored from the hidden state entering layer - 1
                    qs, ks, _ = runner.project(layer, entering[layer - 1], pos)
                if policy in SPECULATIVE and layer > 0:  # from the last SPECULATE_TOKENS (or window) query tokens
                    tail = slice(max(0, t - min(IdentifiedPolicy.SPECULATE_TOKENS, window or t)), None)
                    qe, ke, _ = runner.project(layer, entering[layer - 1][tail], pos[tail])
                    speculated.append(_top(_scores(method, runner, pre.keys[layer], qe, ke, n, budget, low, heads_rule),
                                           budget))
                if 0 < window < t:  # the real query's last `window` tokens score
                    qs = qs[:, -window:]
                chosen = _top(_scores(method, runner, pre.keys[layer], qs, ks, n, budget, low, heads_rule), budget)
                selections.append(chosen)
                keep = torch.zeros(n, dtype=torch.bool)
                for j in chosen:
                    keep[j * C : min((j + 1) * C, n)] = True
            keys = _expand(torch.cat([pre.keys[layer], k], dim=1), heads)
            values = _expand(torch.cat([pre.values[layer], v], dim=1), heads)
            logits = q @ keys.transpose(1, 2) * runner.scaling  # [H, T, n + T]
            mask = torch.cat([~keep.expand(t, n), causal], dim=1)
            out = torch.softmax(logits.masked_fill(mask, -torch.inf), dim=-1) @ values  # [H, T, d]
            hidden = runner.finish(layer, hidden, out.transpose(0, 1).reshape(t, -1))
        return selections, speculated, runner.logits(hidden[-1:])[0]


CASES = [  # prefix tokens, query tokens, budget, period, sub_period, seed
    (150, 12, 0.3, 2, 1, 1),
    (203, 5, 0.2, 1, 1, 2),
    (97, 30, 0.5, 4, 2, 3),
    (180, 40, 0.2, 1, 1, 5),  # more query tokens than the speculation scores with
    (260, 9, 0.1, 2, 2, 4),
]


@pytest.mark.parametrize("policy", sorted(METHODS))
@pytest.mark.parametrize("n,t,budget,period,sub,seed", CASES)
def test_selection_and_output_match_the_reference(served: tuple[ContiguousKVClient, str, Rule], runner: ModelRunner,
                                                  policy: str, n: int, t: int, budget: float, period: int, sub: int,
                                                  seed: int) -> None:
    client, score_dtype, rule = served
    rng = random.Random(seed)
    prefix = [rng.randrange(512) for _ in range(n)]
    query = [rng.randrange(512) for _ in range(t)]
    reg = client.register(token_ids=prefix)
    got = client.reprefill(reg.prefix_id, query, policy=policy, budget=budget, period=period, sub_period=sub,
                           return_logits=True)
    selections, speculated, logits = reference(runner, prefix, query, budget, period, policy, score_dtype, rule)
    assert [list(p.chunks) for p in got.periods] == selections
    assert [p.first_layer for p in got.periods] == list(range(0, runner.num_layers, period))
    assert got.token_id == int(logits.argmax())
    rel = float((torch.tensor(got.logits) - logits).abs().max() / logits.abs().max())
    assert rel < 1e-3, rel
    # exactly the selected records were used; the rest of what arrived was cancelled predictions
    record = 2 * 2 * C * 16 * 4  # K+V x kv_heads x c x head_dim x float32 for the tiny preset
    used = sum(len(p.chunks) * p.num_layers for p in got.periods) * record
    assert got.bytes_kv == used + got.bytes_wasted
    assert [lt.bytes for lt in got.timings.layers] == [
        len(p.chunks) * record for p in got.periods for _ in range(p.num_layers)]
    # predictions: period k+1 was predicted from period k's set, or (speculative policies) from the
    # speculative scores. With p = 1, contiguous+digest scores each period one layer early, which
    # replaces the prediction: nothing predicted after the prior.
    unpredicted = set(range(1, len(got.periods))) if policy == "contiguous+digest" and period == 1 else set()
    assert got.periods[0].predicted == len(selections[0])  # the prior: as many chunks as the budget
    for i, (prev, cur) in enumerate(zip(got.periods, got.periods[1:]), start=1):
        shipped = speculated[i - 1] if policy in SPECULATIVE else prev.chunks
        assert cur.predicted == (0 if i in unpredicted else len(shipped))
        assert cur.predicted_hits == (0 if i in unpredicted else len(set(shipped) & set(cur.chunks)))


def test_same_input_same_output_and_cheaper_than_full(client: ContiguousKVClient) -> None:
    rng = random.Random(9)
    reg = client.register(token_ids=[rng.randrange(512) for _ in range(700)])
    query = [rng.randrange(512) for _ in range(8)]
    full = client.reprefill(reg.prefix_id, query, policy="full")
    for policy in ("contiguous", "contiguous+"):
        a = client.reprefill(reg.prefix_id, query, policy=policy, budget=0.1, period=2)
        b = client.reprefill(reg.prefix_id, query, policy=policy, budget=0.1, period=2)
        assert (a.token_id, a.periods, a.logits) == (b.token_id, b.periods, b.logits)
        assert all(len(p.chunks) == math.ceil(0.1 * reg.num_chunks) for p in a.periods)
        assert all(p.chunks[0] == 0 and p.chunks[-1] == reg.num_chunks - 1 for p in a.periods)
        assert a.bytes_kv < full.bytes_kv / 5
    plus = client.reprefill(reg.prefix_id, query, policy="contiguous+", budget=0.1, period=2, evaluate_recall=True)
    assert 0.0 <= plus.recall <= 1.0 and all(0.0 <= p.recall <= 1.0 for p in plus.periods)
    exact = client.reprefill(reg.prefix_id, query, policy="contiguous+", budget=1.0, evaluate_recall=True)
    assert exact.recall == 1.0
    plain = client.reprefill(reg.prefix_id, query, policy="contiguous", budget=0.1, period=2)
    assert plain.recall == -1.0
    ident = {r.policy: r.bytes_identification + r.bytes_identification_cached for r in (plain, plus)}
    assert ident["contiguous"] > ident["contiguous+"] > 0


@pytest.mark.parametrize("policy", ["contiguous+", "contiguous+1bit", "contiguous+quest", "contiguous+digest", "oracle",
                                    "contiguous"])
def test_identification_cache_serves_hot_prefixes_without_identification_io(client: ContiguousKVClient,
                                                                            policy: str) -> None:
    rng = random.Random(hash(policy) % 1000)
    reg = client.register(token_ids=[rng.randrange(512) for _ in range(500)])
    query = [rng.randrange(512) for _ in range(6)]
    cold = client.reprefill(reg.prefix_id, query, policy=policy, budget=0.2, return_logits=True)
    warm = client.reprefill(reg.prefix_id, query, policy=policy, budget=0.2, return_logits=True)
    assert cold.bytes_identification > 0 and cold.bytes_identification_cached == 0
    assert sum(lt.bytes_identification for lt in cold.timings.layers) == cold.bytes_identification
    assert warm.bytes_identification_cached > 0  # contiguous+digest still reads its shortlists' keys
    assert warm.bytes_identification + warm.bytes_identification_cached == cold.bytes_identification
    if policy != "contiguous+digest":
        assert warm.bytes_identification == 0
        assert all(lt.ident_wait_ms == 0.0 for lt in warm.timings.layers)
    assert (warm.token_id, warm.periods, warm.logits) == (cold.token_id, cold.periods, cold.logits)
    # mispredicted chunks that arrived before their cancel are timing's, not the cache's: compare the rest
    assert warm.bytes_fetched - warm.bytes_wasted < cold.bytes_fetched - cold.bytes_wasted


def test_period_options_are_validated(client: ContiguousKVClient) -> None:
    reg = client.register(token_ids=list(range(40)))
    for kwargs in (dict(period=0), dict(period=2, sub_period=3), dict(sub_period=0)):
        with pytest.raises(InvalidArgumentError, match="period"):
            client.reprefill(reg.prefix_id, [1, 2], policy="contiguous", budget=0.5, **kwargs)  # type: ignore[arg-type]


def test_model_info_names_the_scoring_dtype_and_rule(served: tuple[ContiguousKVClient, str, Rule]) -> None:
    client, score_dtype, rule = served
    info = client.model_info()
    assert (info.score_dtype, info.score_heads, info.score_window) == (score_dtype, *rule)


def test_speculation_runs_on_the_look_ahead_thread_when_there_is_one(served: tuple[ContiguousKVClient, str, Rule],
                                                                    request: pytest.FixtureRequest) -> None:
    client, score_dtype, _ = served
    threads = request.node.callspec.params["served"][1]  # the server's --look-ahead-threads
    url = METRICS[score_dtype, threads]
    rng = random.Random(21)
    reg = client.register(token_ids=[rng.randrange(512) for _ in range(600)])

    def runs() -> tuple[float, float]:
        m = scrape(url)
        return m["ckv_compute_look_ahead_runs_total{where=thread}"], m["ckv_compute_look_ahead_runs_total{where=request}"]

    before = runs()
    speculated = 0
    for n in range(3):
        got = client.reprefill(reg.prefix_id, [3 + n, 4, 5], policy="contiguous+", budget=0.1)
        speculated += len(got.periods) - 1  # every period but the first is scored a layer ahead
    thread, on_request = (a - b for a, b in zip(runs(), before))
    assert thread + on_request == speculated > 0
    if threads:  # the thread takes the work as it is handed out; a request takes back only what it has not begun
        assert thread > 0
    else:
        assert thread == 0
