"""The runner's correctness anchor: our layer loop over prefix KV reproduces the HF forward pass."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from contiguouskv.compute_server.model import runner as runner_module
from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import LoadedModel, load_model
from contiguouskv.compute_server.model.runner import ModelRunner

MODELS = ["random:tiny", "smollm2-135m-instruct"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Small tensors: one thread is as fast, and immune to OpenMP stalls (10x seen) on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=MODELS)
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    cache_dir = Path(os.environ.get("CKV_TEST_CACHE_DIR") or default_cache_dir())
    return load_model(request.param, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tiny() -> ModelRunner:
    return ModelRunner(load_model("random:tiny", cache_dir=default_cache_dir()))


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(input_ids=ids[None]).logits[0, -1].float()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _query_over_prefix(r: ModelRunner, query: torch.Tensor, keys: list, values: list, n: int) -> torch.Tensor:
    hidden = r.embed(query)
    positions = torch.arange(n, n + len(query))
    for layer in range(r.num_layers):
        hidden, _, _ = r.run_layer(layer, hidden, positions, keys[layer], values[layer])
    return r.logits(hidden[-1:])[0]


@pytest.mark.parametrize(("n", "t", "block"), [(37, 1, 16), (203, 117, 64)])
def test_query_over_prefix_kv_matches_hf_forward(loaded: LoadedModel, n: int, t: int, block: int) -> None:
    r = ModelRunner(loaded)
    ids = _ids(n + t, loaded.vocab_size, seed=n)
    prefix = r.prefill(ids[:n], block_size=block)
    got = _query_over_prefix(r, ids[n:], prefix.keys, prefix.values, n)
    want = _reference(loaded, ids)
    assert _relative(got, want) < 1e-3
    assert int(got.argmax()) == int(want.argmax())
    prefix_want = _reference(loaded, ids[:n])
    assert _relative(prefix.logits, prefix_want) < 1e-3
    assert prefix.logits.dtype == torch.float32 and prefix.logits.shape == (loaded.vocab_size,)


def test_blockwise_prefill_equals_one_shot(loaded: LoadedModel) -> None:
    r = ModelRunner(loaded)
    ids = _ids(203, loaded.vocab_size, seed=7)
    blocks = r.prefill(ids, block_size=16)
    whole = r.prefill(ids, block_size=4096)
    assert len(blocks.keys) == len(blocks.values) == loaded.num_layers
    assert blocks.keys[0].shape == (loaded.num_kv_heads, 203, loaded.head_dim)
    for a, b in zip(blocks.keys + blocks.values, whole.keys + whole.values):
        assert _relative(a, b) < 1e-4
    assert _relative(blocks.logits, whole.logits) < 1e-4


def test_last_queries_are_the_projections_of_the_last_tokens(tiny: ModelRunner) -> None:
    ids = _ids(37, 512, seed=3)
    result = tiny.prefill(ids, block_size=16, keep_last_queries=10)  # spans blocks 16..31 and 32..36
    whole = tiny.prefill(ids, block_size=64, keep_last_queries=37)
    assert tiny.prefill(ids, block_size=16).last_queries == []
    for layer, q in enumerate(result.last_queries):
        assert q.shape == (tiny.num_heads, 10, tiny.head_dim)
        assert torch.allclose(q, whole.last_queries[layer][:, -10:], atol=1e-5)
    hidden = tiny.embed(ids)
    q0, k0, _ = tiny.project(0, hidden, torch.arange(37))
    assert torch.allclose(result.last_queries[0], q0[:, -10:], atol=1e-5)
    assert torch.allclose(result.keys[0], k0, atol=1e-5)


def _eager_attention(r: ModelRunner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    groups = r.num_heads // r.num_kv_heads
    k = k.repeat_interleave(groups, dim=0)  # [H, S+T, d]
    v = v.repeat_interleave(groups, dim=0)
    scores = q @ k.transpose(1, 2) * r.scaling  # [H, T, S+T]
    tokens, total = q.shape[1], k.shape[1]
    visible = torch.arange(total)[None, :] <= torch.arange(past, past + tokens)[:, None]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1).reshape(tokens, -1)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("max_scores", [runner_module.MAX_SCORES_PER_CALL, 500])
def test_attend_over_a_selected_subset(
    tiny: ModelRunner, monkeypatch: pytest.MonkeyPatch, pack: bool, max_scores: int
) -> None:
    """Selected past keys (not all, not contiguous) + causal new keys; tiled, and with the CUDA
    path's query heads packed per KV head (tiny has 2 query heads per KV head)."""
    monkeypatch.setattr(runner_module, "MAX_SCORES_PER_CALL", max_scores)
    monkeypatch.setattr(runner_module, "_pack_query_groups", lambda device: pack)
    ids = _ids(80, 512, seed=11)
    prefix = tiny.prefill(ids[:64], block_size=32)
    chosen = torch.tensor([0, 1, 2, 3, 16, 17, 40, 41, 42, 63])
    hidden = tiny.embed(ids[64:])
    q, k, v = tiny.project(1, hidden, torch.arange(64, 80))
    k_all = torch.cat([prefix.keys[1][:, chosen], k], dim=1)
    v_all = torch.cat([prefix.values[1][:, chosen], v], dim=1)
    got = tiny.attend(q, k_all, v_all, len(chosen))
    assert got.shape == (16, tiny.num_heads * tiny.head_dim)
    assert torch.allclose(got, _eager_attention(tiny, q, k_all, v_all, len(chosen)), atol=1e-5)


def test_empty_past_equals_no_past(tiny: ModelRunner) -> None:
    hidden = tiny.embed(_ids(5, 512, seed=1))
    positions = torch.arange(5)
    empty = torch.empty(tiny.num_kv_heads, 0, tiny.head_dim)
    with_empty = tiny.run_layer(0, hidden, positions, empty, empty)
    without = tiny.run_layer(0, hidden, positions)
    assert all(torch.equal(a, b) for a, b in zip(with_empty, without))


def test_attend_rejects_mismatched_lengths(tiny: ModelRunner) -> None:
    q, k, v = tiny.project(0, tiny.embed(_ids(4, 512, seed=2)), torch.arange(4))
    with pytest.raises(ValueError, match="num_past"):
        tiny.attend(q, k, v, 2)


def test_positions_matter(tiny: ModelRunner) -> None:
    """The anchor can fail: running the query at the wrong positions changes the logits."""
    ids = _ids(50, 512, seed=5)
    prefix = tiny.prefill(ids[:40])
    right = _query_over_prefix(tiny, ids[40:], prefix.keys, prefix.values, 40)
    wrong = _query_over_prefix(tiny, ids[40:], prefix.keys, prefix.values, 0)
    assert _relative(wrong, right) > 1e-2


def test_bfloat16_runner_tracks_hf(tmp_path: Path) -> None:
    loaded = load_model("random:tiny", cache_dir=tmp_path, dtype=torch.bfloat16)
    r = ModelRunner(loaded)
    assert r.dtype == torch.bfloat16
    ids = _ids(60, 512, seed=9)
    prefix = r.prefill(ids[:50], block_size=16)
    assert prefix.keys[0].dtype == torch.bfloat16
    got = _query_over_prefix(r, ids[50:], prefix.keys, prefix.values, 50)
    assert _relative(got, _reference(loaded, ids)) < 5e-2


def test_qwen3_folder_with_qk_norm_matches_hf(tmp_path: Path) -> None:
    """A local-folder Qwen3 model: exercises q_norm/k_norm and loading by path."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, initializer_range=0.2, max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    loaded = load_model(str(tmp_path / "qwen3"), cache_dir=tmp_path)
    r = ModelRunner(loaded)
    ids = _ids(70, 300, seed=4)
    prefix = r.prefill(ids[:45], block_size=16)
    got = _query_over_prefix(r, ids[45:], prefix.keys, prefix.values, 45)
    assert _relative(got, _reference(loaded, ids)) < 1e-3
