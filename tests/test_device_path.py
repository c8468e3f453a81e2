"""One device path: every tensor that reaches the model or the scorers is on the engine's device.

Tensors made from wire bytes reach the compute device only through
:func:`contiguouskv.compute_server.kvio.staging.to_device_now` (pinned buffer and side-stream copy on
CUDA, the tensor itself on the CPU), called by the codecs' decode methods with the policy's device.
:class:`DeviceCheck` is a ``TorchFunctionMode`` that sees every torch call made while it is active
and records each one with a tensor operand on another device than the expected one (0-dim CPU
tensors excepted: torch takes them as scalars). Calls made by the staging path itself (the staging
module, the codecs decoding records into host buffers) are where a host tensor legitimately meets
the device, so they are not counted.

The end-to-end test serves every built-in policy from an in-process ComputeCore against a real
cache server with the check active wherever the model and the scorers run: around each policy's
``compute`` (the layer loop and the policy's own scoring, on whichever thread runs it) and around
the model runner's stages (on whichever thread runs those). A policy's ``start_load_kv`` runs on
the event loop and only decides which records to ask for (index lists), so it is not checked.
On this CPU-only machine every tensor is on the CPU, so two controls prove the check can fail: a
scorer fed a ``meta`` operand, and the same end-to-end harness expecting ``meta`` instead of the
engine's device. With CUDA, the end-to-end test also runs on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from contiguouskv import launch
from contiguouskv.compute_server.cachenet.cache_client import CacheClient
from contiguouskv.compute_server.config import ComputeServerConfig, default_cache_dir
from contiguouskv.compute_server.core import ComputeCore
from contiguouskv.compute_server.kvio.staging import to_device_now
from contiguouskv.compute_server.layouts.base import KVGeometry
from contiguouskv.compute_server.layouts.contiguous import ContiguousLayout
from contiguouskv.compute_server.layouts.contiguous_codec import ContiguousCodec
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.model.runner import ModelRunner
from contiguouskv.compute_server.policies.impress import ImpressPolicy
from contiguouskv.compute_server.policies.registry import BUILTIN_POLICIES
from contiguouskv.compute_server.request import ReprefillArgs
from contiguouskv.compute_server.selection.chunks import exact_chunk_scores

MODEL = "random:tiny"  # 4 layers, 4 query heads over 2 KV heads of 16, vocabulary 512
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
SERVER_DIR = Path(__file__).resolve().parents[1] / "compute_server"
STAGING_PATH = (  # where host tensors meet the device on purpose: staging, and decoding into host buffers
    str(SERVER_DIR / "kvio" / "staging.py"),
    str(SERVER_DIR / "layouts" / "contiguous_codec.py"),
    str(SERVER_DIR / "layouts" / "impress_codec.py"),
    str(SERVER_DIR / "layouts" / "tensors.py"),
)
RUNNER_STAGES = ("embed", "project", "attend", "finish", "run_layer", "logits", "prefill")


# --- the check ----------------------------------------------------------------------------------
def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, looking into lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _same(actual: torch.device, expected: torch.device) -> bool:
    return actual.type == expected.type and (expected.index is None or actual.index == expected.index)


def _caller() -> str:
    """The file of the first frame outside torch and this module: who made the torch call."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "?"


class DeviceCheck:
    """Violations and callers seen by every :class:`_DeviceMode` entered for it, on any thread."""

    def __init__(self, expected: torch.device | str) -> None:
        self.expected = torch.device(expected)
        self.violations: list[str] = []
        self.callers: set[str] = set()
        self.calls = 0
        self._active = threading.local()

    def inspect(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        caller = _caller()
        self.callers.add(caller)
        off = sorted({str(t.device) for t in _tensors((args, kwargs))
                      if not _same(t.device, self.expected) and not (t.dim() == 0 and t.device.type == "cpu")})
        if off and caller not in STAGING_PATH:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            self.violations.append(f"{name} from {caller}: operands on {', '.join(off)}, expected {self.expected}")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The check on the calling thread (once: nested entries on the same thread do nothing)."""
        if getattr(self._active, "on", False):
            yield
            return
        self._active.on = True
        try:
            with _DeviceMode(self):
                yield
        finally:
            self._active.on = False

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def checked(*args: Any, **kwargs: Any) -> Any:
            with self.active():
                return fn(*args, **kwargs)

        return checked

    def saw(self, path: Path) -> bool:
        return str(path) in self.callers


class _DeviceMode(TorchFunctionMode):
    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        self.check.inspect(func, args, kwargs)
        return func(*args, **kwargs)


# --- unit tests ---------------------------------------------------------------------------------
def test_to_device_now_on_the_cpu_is_the_tensor_itself() -> None:
    host = torch.arange(12, dtype=torch.float32).view(3, 4)
    out = to_device_now(host, torch.device("cpu"))
    assert out is host
    assert torch.equal(out, torch.arange(12, dtype=torch.float32).view(3, 4))
    assert to_device_now(host, "cpu") is host


def test_codecs_decode_onto_the_device_through_staging() -> None:
    codec = ContiguousCodec.for_prefix(40, KVGeometry(2, 4, 2, 8, "float32", 16, 1))
    lay = codec.geometry
    keys = torch.randn(lay.num_kv_heads, lay.num_chunks * lay.chunk_size, lay.head_dim)
    records = [memoryview(keys[:, c * 16 : (c + 1) * 16].contiguous().numpy().tobytes())
               for c in range(lay.num_chunks)]
    decoded = codec.layer_keys(records, device=torch.device("cpu"))
    assert decoded.device.type == "cpu" and torch.equal(decoded, keys[:, :40])
    digest = torch.randn(lay.num_chunks, lay.num_kv_heads, lay.head_dim)
    assert torch.equal(codec.digest(memoryview(digest.numpy().tobytes()), device="cpu"), digest)


def test_the_check_catches_an_operand_on_another_device() -> None:
    """Negative control on a CPU-only machine: a scorer given prefix keys on ``meta``."""
    lay = ContiguousLayout(40, 1, 2, 8, "float32", 16, 1)
    q, k_self = torch.randn(4, 3, 8), torch.randn(2, 3, 8)
    check = DeviceCheck("cpu")
    with check.active(), contextlib.suppress(RuntimeError, NotImplementedError):
        exact_chunk_scores(lay, q, k_self, torch.randn(2, 40, 8, device="meta"), 0.35)
    assert any("meta" in v for v in check.violations), check.violations
    check = DeviceCheck("cpu")
    with check.active(), contextlib.suppress(RuntimeError, NotImplementedError):
        torch.matmul(torch.ones(2, 2), torch.ones(2, 2, device="meta"))
    assert check.violations and "matmul" in check.violations[0], check.violations
    check = DeviceCheck("cpu")  # and stays quiet when everything is on its device
    with check.active():
        exact_chunk_scores(lay, q, k_self, torch.randn(2, 40, 8), 0.35)
        torch.add(torch.ones(3), torch.tensor(2.0))  # a 0-dim CPU tensor is a scalar anywhere
    assert check.violations == [] and check.calls > 0


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with launch.cache_server(tmp_path_factory.mktemp("store")) as cache:
        yield cache.address


CASES = [  # (policy, ImpressPolicy.alpha): impress once falling back, once voting
    *[(cls.name, None) for cls in BUILTIN_POLICIES if cls is not ImpressPolicy],
    ("impress", 0.6), ("impress", 8.0),
]


def _serve_checked(address: str, device: str, check: DeviceCheck, cases: list[tuple[str, float | None]],
                   monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, set[str]]]:
    """Serve ``cases`` from one prefix with ``check`` active around each policy's ``compute`` and
    the runner's stages; per case, the check's call count and the callers seen during it."""
    model = load_model(MODEL, cache_dir=default_cache_dir(), device=device)
    rng = random.Random(7)
    prefix = [rng.randrange(512) for _ in range(300)]
    query = [rng.randrange(512) for _ in range(6)]

    async def main() -> dict[str, tuple[int, set[str]]]:
        config = ComputeServerConfig(model=MODEL, cache=(address,), device=device, dtype="float32")
        cache = CacheClient(config.cache, config.max_message_bytes, 60.0)
        core = ComputeCore(config, model, ModelRunner(model), cache)

        async def no_report(*args: object) -> None:  # attention reports are not what this test is about
            return None

        monkeypatch.setattr(core.cache, "report_attention", no_report)
        seen: dict[str, tuple[int, set[str]]] = {}
        try:
            reg = await core.register(prefix, ["impress"])
            with monkeypatch.context() as patch:  # checked from here on: the requests, not the registration
                for cls in core.policies.classes():
                    patch.setattr(cls, "compute", check.wrap(cls.compute))
                for stage in RUNNER_STAGES:
                    patch.setattr(ModelRunner, stage, check.wrap(getattr(ModelRunner, stage)))
                for name, alpha in cases:
                    if alpha is not None:
                        patch.setattr(ImpressPolicy, "alpha", alpha)
                    calls, callers = check.calls, set(check.callers)
                    check.callers.clear()
                    got = await core.reprefill(ReprefillArgs(reg.prefix_id, query, name, 0.3, period=2,
                                                             sub_period=1, evaluate_recall=True))
                    assert got.policy == name
                    seen[f"{name}/{alpha}"] = (check.calls - calls, set(check.callers))
                    check.callers |= callers
            return seen
        finally:
            core.close()
            await cache.close()

    return asyncio.run(main())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_policy_keeps_every_tensor_on_the_engine_device(cache_address: str, device: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    check = DeviceCheck(device)
    seen = _serve_checked(cache_address, device, check, CASES, monkeypatch)
    assert check.violations == [], "\n".join(check.violations[:20])
    assert set(seen) == {f"{n}/{a}" for n, a in CASES}
    for case, (calls, callers) in seen.items():  # the check was there: the model, and each scorer
        assert calls > 0, case
        assert str(SERVER_DIR / "model" / "runner.py") in callers, case
    for case, scorer in [("contiguous/None", "chunks.py"), ("contiguous+/None", "chunks.py"),
                         ("impress/0.6", "tokens.py"), ("impress/8.0", "tokens.py")]:
        assert str(SERVER_DIR / "selection" / scorer) in seen[case][1], (case, sorted(seen[case][1]))


def test_the_end_to_end_check_catches_tensors_off_the_expected_device(cache_address: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control of the harness itself: the same requests, expecting ``meta``, are all flagged."""
    check = DeviceCheck("meta")
    _serve_checked(cache_address, "cpu", check, [("contiguous", None), ("impress", 0.6)], monkeypatch)
    flagged = "\n".join(check.violations)
    assert str(SERVER_DIR / "model" / "runner.py") in flagged
    assert str(SERVER_DIR / "selection" / "chunks.py") in flagged
    assert str(SERVER_DIR / "selection" / "tokens.py") in flagged
