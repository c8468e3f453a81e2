"""End to end through real servers: a cache server and compute servers as separate processes.

The correctness anchor lives here: `full` and `recompute` reproduce the model's own Hugging Face
forward pass over prefix + query (same greedy token, last-position logits within 1e-3 relative).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from contiguouskv import launch
from contiguouskv.client import (
    ContiguousKVClient, FailedPreconditionError, InvalidArgumentError, NotFoundError,
)
from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import load_model

TINY = "random:tiny"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launch.ServiceProcess]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as proc:
        yield proc


def _compute(model: str, cache: launch.ServiceProcess) -> Iterator[ContiguousKVClient]:
    with launch.compute_server(model, cache.address, "--device", "cpu", "--dtype", "float32") as proc:
        with ContiguousKVClient(proc.address, timeout=300) as client:
            yield client


@pytest.fixture(scope="module")
def tiny(cache: launch.ServiceProcess) -> Iterator[ContiguousKVClient]:
    yield from _compute(TINY, cache)


@pytest.fixture(scope="module")
def smol(cache: launch.ServiceProcess) -> Iterator[ContiguousKVClient]:
    yield from _compute(SMOL, cache)


def _reference(model: str, ids: list[int]) -> torch.Tensor:
    loaded = load_model(model, cache_dir=default_cache_dir())
    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _check_anchor(client: ContiguousKVClient, model: str, prefix: list[int], query: list[int]) -> None:
    ref = _reference(model, prefix + query)
    reg = client.register(token_ids=prefix, extra_layouts=["impress"])
    assert reg.num_tokens == len(prefix) and reg.num_chunks == -(-len(prefix) // 16)
    for policy, period in (("full", None), ("recompute", None), ("contiguous", None), ("contiguous+", None),
                           ("contiguous", 1), ("contiguous+", 3), ("h2o", None), ("impress", None),
                           ("contiguous+quest", None), ("contiguous+digest", None), ("oracle", None),
                           ("contiguous+1bit", None)):
        r = client.reprefill(reg.prefix_id, query, policy=policy, budget=1.0, period=period,
                             sub_period=1 if period else None, return_logits=True)
        got = torch.tensor(r.logits)
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert r.token_id == int(ref.argmax()), (policy, r.token_id, int(ref.argmax()))
        assert rel < 1e-3, (policy, rel)
        assert r.prefix_tokens == len(prefix) and r.query_tokens == len(query)
    full = client.reprefill(reg.prefix_id, query, policy="full")
    # `full` reads every kv record of every layer: 2 (K, V) x layers x chunks x kv_heads x 16 x head_dim x 4 B.
    info = client.model_info()
    expected = 2 * info.num_layers * reg.num_chunks * info.num_kv_heads * 16 * info.head_dim * 4
    assert full.bytes_fetched == expected
    assert len(full.timings.layers) == info.num_layers


@pytest.mark.parametrize("prefix_len,query_len", [(37, 1), (203, 117)])
def test_anchor_random_preset(tiny: ContiguousKVClient, prefix_len: int, query_len: int) -> None:
    _check_anchor(tiny, TINY, _ids(prefix_len, 512, prefix_len), _ids(query_len, 512, query_len + 1))


@pytest.mark.parametrize("prefix_len,query_len", [(45, 1), (181, 103)])
def test_anchor_smollm2(smol: ContiguousKVClient, prefix_len: int, query_len: int) -> None:
    _check_anchor(smol, SMOL, _ids(prefix_len, 49152, prefix_len), _ids(query_len, 49152, query_len + 7))


def test_greedy_continuation_is_the_models(tiny: ContiguousKVClient) -> None:
    """Tokens after the first, at budget 1.0, are the model's own greedy continuation."""
    prefix, query = _ids(90, 512, 11), _ids(5, 512, 12)
    loaded = load_model(TINY, cache_dir=default_cache_dir())
    ids, want = prefix + query, []
    with torch.inference_mode():
        for _ in range(8):
            want.append(int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(want[-1])
    reg = tiny.register(token_ids=prefix)
    for policy in ("full", "recompute", "contiguous+"):
        r = tiny.reprefill(reg.prefix_id, query, policy=policy, budget=1.0, max_new_tokens=7)
        assert [r.token_id, *r.generated_ids] == want, policy


def test_bfloat16_kv_under_float32_compute(cache: launch.ServiceProcess) -> None:
    """--kv-dtype stores the prefix KV narrower than the compute dtype: half the bytes, and the
    answer at budget 1.0 stays the model's own within bfloat16 rounding of the KV."""
    prefix, query = _ids(150, 512, 5), _ids(9, 512, 6)
    ref = _reference(TINY, prefix + query)
    with launch.compute_server(TINY, cache.address, "--dtype", "float32", "--kv-dtype", "bfloat16") as compute:
        with ContiguousKVClient(compute.address, timeout=120) as client:
            assert client.model_info().dtype == "bfloat16"
            reg = client.register(token_ids=prefix)
            for policy in ("full", "contiguous+", "oracle"):
                r = client.reprefill(reg.prefix_id, query, policy=policy, budget=1.0, return_logits=True)
                assert r.token_id == int(ref.argmax())
                assert float((torch.tensor(r.logits) - ref).abs().max() / ref.abs().max()) < 3e-2
                if policy == "full":
                    info = client.model_info()
                    assert r.bytes_kv == 2 * info.num_layers * reg.num_chunks * info.num_kv_heads * 16 * info.head_dim * 2


def test_concurrent_registrations_of_one_prefix_prefill_it_once(tiny: ContiguousKVClient) -> None:
    tokens = _ids(2000, 512, 41)
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: tiny.register(token_ids=tokens), range(3)))
    assert len({r.prefix_id for r in replies}) == 1
    stored = [r for r in replies if not r.already_registered]
    assert len(stored) == 1 and stored[0].prefill_ms > 0 and stored[0].bytes_stored > 0
    assert all(r.prefill_ms == 0 and r.bytes_stored == 0 for r in replies if r.already_registered)


def test_text_prefix_and_generation_agree(smol: ContiguousKVClient) -> None:
    reg = smol.register("The capital of France is Paris. The capital of Italy is Rome. " * 6)
    again = smol.register("The capital of France is Paris. The capital of Italy is Rome. " * 6)
    assert again.prefix_id == reg.prefix_id and again.already_registered and not reg.already_registered
    query = " The capital of France is"
    full = smol.reprefill(reg.prefix_id, query, policy="full", max_new_tokens=6)
    recompute = smol.reprefill(reg.prefix_id, query, policy="recompute", max_new_tokens=6)
    assert full.token_id == recompute.token_id
    assert full.generated_ids == recompute.generated_ids and len(full.generated_ids) >= 1
    assert "Paris" in full.answer
    streamed = list(smol.generate(reg.prefix_id, query, max_new_tokens=6))
    assert [t.token_id for t in streamed] == [full.token_id, *full.generated_ids]
    assert [t.index for t in streamed] == list(range(len(streamed)))
    assert "".join(t.text for t in streamed) == full.answer == full.answer_text
    # characters split over tokens (kana, emoji): the answer is decoded as one sequence, and the
    # stream hands each character out whole, once complete (a character the last token leaves
    # unfinished is not streamed)
    query = " 日本語の質問：金庫のコードは？🔐"
    full = smol.reprefill(reg.prefix_id, query, policy="full", max_new_tokens=8)
    streamed = list(smol.generate(reg.prefix_id, query, max_new_tokens=8))
    assert [t.token_id for t in streamed] == [full.token_id, *full.generated_ids]
    joined = "".join(t.text for t in streamed)
    assert "\ufffd" not in joined and full.answer.rstrip("\ufffd") == joined


def test_bad_input_gets_clear_statuses(tiny: ContiguousKVClient) -> None:
    reg = tiny.register(token_ids=_ids(40, 512, 3))
    pid = reg.prefix_id
    with pytest.raises(NotFoundError, match="not registered"):
        tiny.reprefill("0" * 32, [1, 2])
    with pytest.raises(NotFoundError, match="not registered"):
        list(tiny.generate("0" * 32, [1, 2], max_new_tokens=2))
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        list(tiny.generate(pid, [1, 2], max_new_tokens=10_000))
    cases = [
        (dict(prefix_id=pid, query=[]), "query"),
        (dict(prefix_id=pid, query=[1], budget=0.0), "budget"),
        (dict(prefix_id=pid, query=[1], budget=1.5), "budget"),
        (dict(prefix_id=pid, query=[1], budget=-0.1), "budget"),
        (dict(prefix_id=pid, query=[1], policy="magic"), "policy"),
        (dict(prefix_id="../etc/passwd", query=[1]), "prefix_id"),
        (dict(prefix_id=pid.upper(), query=[1]), "prefix_id"),
        (dict(prefix_id=pid, query=[1] * 5000), "query"),
        (dict(prefix_id=pid, query=[600]), "query"),
        (dict(prefix_id=pid, query="text without a tokenizer"), "tokenizer"),
        (dict(prefix_id=pid, query=[1], period=2, sub_period=3), "sub_period"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgumentError, match=field):
            tiny.reprefill(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="prefix"):
        tiny.register(token_ids=[1] * 5000)  # the tiny preset has 4096 positions
    with pytest.raises(InvalidArgumentError, match="prefix"):
        tiny.register(token_ids=[])
    # still serving, and the stored prefix still answers
    assert tiny.reprefill(pid, [1, 2, 3]).prefix_tokens == 40


def test_prefix_of_another_model_is_a_failed_precondition(tiny: ContiguousKVClient, smol: ContiguousKVClient) -> None:
    reg = tiny.register(token_ids=_ids(50, 512, 11))
    with pytest.raises(FailedPreconditionError, match="stored for model"):
        smol.reprefill(reg.prefix_id, [1, 2, 3])
    assert smol.model_info().name == SMOL


async def test_async_client_matches_sync(tiny: ContiguousKVClient) -> None:
    from contiguouskv.client import AsyncContiguousKVClient

    prefix = _ids(70, 512, 21)
    sync_reg = tiny.register(token_ids=prefix)
    expected = tiny.reprefill(sync_reg.prefix_id, [7, 8, 9], max_new_tokens=3)
    async with AsyncContiguousKVClient(tiny.address, timeout=120) as client:
        reg = await client.register(token_ids=prefix)
        assert reg.prefix_id == sync_reg.prefix_id and reg.already_registered
        got = await client.reprefill(reg.prefix_id, [7, 8, 9], max_new_tokens=3)
        assert (got.token_id, got.generated_ids) == (expected.token_id, expected.generated_ids)
        streamed = [t.token_id async for t in client.generate(reg.prefix_id, [7, 8, 9], max_new_tokens=3)]
        assert streamed == [expected.token_id, *expected.generated_ids]
        with pytest.raises(NotFoundError):
            await client.reprefill("a" * 32, [1])
        assert (await client.model_info()).num_layers == tiny.model_info().num_layers


def test_compute_health_reflection_and_graceful_stop(cache: launch.ServiceProcess) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    proc = launch.compute_server(TINY, cache.address, "--dtype", "float32")
    proc.wait_ready()
    with grpc.insecure_channel(proc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "contiguouskv.v1.ComputeService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "contiguouskv.v1.ComputeService" in names
    assert proc.stop() == 0
