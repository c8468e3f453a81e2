"""The per-KV-head selection experiment (`bench perhead`) against the model's own forward pass."""

from __future__ import annotations

import torch

from contiguouskv.bench.perhead import _answer, _choose, _stand_in
from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.model.runner import ModelRunner


def test_unselected_and_whole_budget_answers_are_the_models_greedy_tokens() -> None:
    torch.set_grad_enabled(False)
    loaded = load_model("random:tiny", cache_dir=default_cache_dir(), dtype=torch.float32)
    runner = ModelRunner(loaded)
    prefix, query = list(range(5, 105)), [7, 9, 11, 300]
    pre = runner.prefill(torch.tensor(prefix))
    ids, want = prefix + query, []
    for _ in range(4):
        token = int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        want.append(token)
        ids.append(token)
    assert _answer(runner, pre, prefix, query, None, 3) == want
    for mode in ("layer", "head", "estimate"):
        assert _answer(runner, pre, prefix, query, (mode, 1.0), 3) == want


def test_choose_keeps_k_chunks_per_head_or_one_shared_set() -> None:
    n, c, kvh, g = 100, 16, 2, 2
    m = -(-n // c)
    probs = torch.zeros(kvh * g, 3, n)
    probs[:g, :, 40] = 1.0  # KV head 0's query group looks at chunk 2
    probs[g:, :, 70] = 0.5  # KV head 1's at chunk 4
    head = _choose(probs, ("head", 0.4), kvh, g, n, m, c)  # k = 3: sink, last, and each head's own
    layer = _choose(probs, ("layer", 0.4), kvh, g, n, m, c)
    assert head.shape == (kvh, n) and bool(head[0, 40]) and not bool(head[0, 70]) and bool(head[1, 70])
    assert torch.equal(layer[0], layer[1]) and bool(layer[0, 40]) and not bool(layer[0, 70])
    assert int(head.view(kvh, -1)[:, ::c].sum(dim=1).max()) == 3  # 3 chunk starts kept per head


def test_stand_in_replaces_unselected_tokens_by_their_chunks_mean_value() -> None:
    n, c, kvh, d = 40, 16, 2, 3  # chunks of 16, 16 and 8 tokens, then 2 query tokens
    values = torch.randn(kvh, n + 2, d)
    keep = torch.zeros(kvh, n, dtype=torch.bool)
    keep[:, 16:32] = True  # the middle chunk read
    out = _stand_in(values, keep, n, c)
    assert torch.equal(out[:, 16:32], values[:, 16:32]) and torch.equal(out[:, n:], values[:, n:])
    assert torch.allclose(out[:, :16], values[:, :16].mean(dim=1, keepdim=True).expand(kvh, 16, d))
    assert torch.allclose(out[:, 32:40], values[:, 32:40].mean(dim=1, keepdim=True).expand(kvh, 8, d))  # short chunk
    assert not torch.equal(out[:, :16], values[:, :16]) and torch.equal(_stand_in(values, ~keep | keep, n, c), values)
