"""Loading policies are plug-ins: the registry alone adds one, the core names none.

A policy defined in a test module (``plugin_policies``) is served by a real compute server started
with ``--policy-plugin``, end to end through real gRPC and a real cache server, with no edit to the
server's code.
"""

from __future__ import annotations

import ast
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient, ModelInfo
from contiguouskv.compute_server.policies.base import LoadingPolicy
from contiguouskv.compute_server.policies.full import FullPolicy
from contiguouskv.compute_server.policies.registry import BUILTIN_POLICIES, PolicyRegistry, load_plugin

MODEL = "random:tiny"  # 4 layers, 2 KV heads of 16
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PLUGIN = "plugin_policies:RecentChunksPolicy"


def _with_tests_on_path() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContiguousKVClient]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        with launch.compute_server(MODEL, cache.address, "--dtype", "float32", "--policy-plugin", PLUGIN,
                                   env=_with_tests_on_path()) as compute:
            with ContiguousKVClient(compute.address, timeout=120) as c:
                yield c


def test_the_plugin_is_listed_with_what_it_declares(client: ContiguousKVClient) -> None:
    info: ModelInfo = client.model_info()
    assert info.policies == (*(p.name for p in BUILTIN_POLICIES), "recent")
    recent = info.policy("recent")
    assert (recent.layout, recent.selective, recent.loads_kv, recent.default_period) == ("contiguous", True, True, 8)
    assert info.policy("contiguous+").default_period == 1 and not info.policy("recompute").loads_kv
    assert not info.policy("full").selective and info.policy("impress").layout == "impress"
    assert info.extra_layouts == ("impress",)


def test_the_plugin_at_budget_one_reproduces_full(client: ContiguousKVClient) -> None:
    rng = random.Random(3)
    prefix = client.register(token_ids=[rng.randrange(512) for _ in range(200)])
    query = [rng.randrange(512) for _ in range(7)]
    full = client.reprefill(prefix.prefix_id, query, policy="full", return_logits=True, max_new_tokens=4)
    recent = client.reprefill(prefix.prefix_id, query, policy="recent", budget=1.0, return_logits=True,
                              max_new_tokens=4)
    assert recent.token_id == full.token_id and recent.generated_ids == full.generated_ids
    assert max(abs(a - b) for a, b in zip(recent.logits, full.logits)) <= 1e-4 * max(map(abs, full.logits))
    assert recent.bytes_kv == full.bytes_kv == 4 * prefix.num_chunks * 2 * 2 * 16 * 16 * 4


def test_the_plugin_reads_only_what_it_chose(client: ContiguousKVClient) -> None:
    rng = random.Random(4)
    prefix = client.register(token_ids=[rng.randrange(512) for _ in range(300)])  # 19 chunks
    r = client.reprefill(prefix.prefix_id, [5, 6, 7], policy="recent", budget=0.25)
    k = math.ceil(0.25 * prefix.num_chunks)
    record = 2 * 2 * 16 * 16 * 4  # K and V, 2 KV heads, 16 tokens, head_dim 16, float32
    assert r.chunks_loaded == k and r.bytes_kv == 4 * k * record and r.bytes_identification == 0
    tokens = 16 * (k - 1) - (16 * prefix.num_chunks - 300) + 16  # the last chunk is partial
    assert r.bytes_selected == 4 * tokens * record // 16
    assert r.budget == 0.25 and r.policy == "recent"


def test_a_bad_plugin_stops_the_server_with_its_reason(tmp_path: Path) -> None:
    proc = launch.compute_server(MODEL, "127.0.0.1:1", "--policy-plugin", "plugin_policies:NotAPolicy",
                                 env=_with_tests_on_path())
    try:
        with pytest.raises(RuntimeError, match="NotAPolicy is not a LoadingPolicy subclass"):
            proc.wait_ready(timeout=60)
    finally:
        proc.stop()


def test_the_registry_refuses_clashes_and_non_policies() -> None:
    class Twin(FullPolicy):
        pass

    with pytest.raises(ValueError, match="'full' is taken by FullPolicy"):
        PolicyRegistry([*BUILTIN_POLICIES, Twin])
    with pytest.raises(ValueError, match="expected module.path:ClassName"):
        load_plugin("plugin_policies")
    with pytest.raises(ValueError, match="cannot import"):
        load_plugin("no_such_module_here:X")
    registry = PolicyRegistry.with_plugins()
    assert "recent" not in registry and registry.names == tuple(p.name for p in BUILTIN_POLICIES)
    assert all(issubclass(registry.get(n), LoadingPolicy) for n in registry.names)


def test_the_core_names_no_policy_and_checks_no_policy_type() -> None:
    """The request path is policy-agnostic: no policy name literal, no isinstance on a policy."""
    tree = ast.parse((ROOT / "compute_server" / "core.py").read_text())
    names = {p.name for p in BUILTIN_POLICIES}
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    policy_classes = {p.__name__ for p in BUILTIN_POLICIES} | {"LoadingPolicy"}
    checks = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "isinstance"
              and any(isinstance(a, ast.Name) and a.id in policy_classes for a in ast.walk(n))]
    assert literals == [] and checks == []
