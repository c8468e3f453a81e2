"""The SDK against fake compute servers: retries, round robin, timeouts, streams, errors, typing.

The fakes are in-process gRPC servers whose replies and failures the test scripts, so each property
is checked in isolation and fast; the real servers are exercised in test_compute_e2e.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from contiguouskv import client as sdk
from contiguouskv.client import _wire
from contiguouskv.client import (
    NO_RETRY, AsyncContiguousKVClient, ContiguousKVClient, ContiguousKVError, DeadlineExceededError,
    FailedPreconditionError, InvalidArgumentError, NotFoundError, RetryPolicy, UnavailableError,
)
from contiguouskv.client.errors import ERRORS_BY_STATUS
from contiguouskv.client.pool import parse_addresses
from contiguouskv.client.retry import Deadline
from contiguouskv.v1 import compute_pb2, compute_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
PREFIX = "ab" * 16


class FakeCompute(compute_pb2_grpc.ComputeServiceServicer):
    """Answers every call; ``failures`` (status codes) are used up first, one per call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []
        self.failures: list[grpc.StatusCode] = []
        self.delay_s = 0.0
        self.tokens_then_fail: int | None = None  # Generate: send this many tokens, then UNAVAILABLE
        self.token_delay_s = 0.0  # Generate: pause before each token after the first
        self._lock = threading.Lock()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(method)
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            context.abort(failure, f"{self.name}: scripted {failure.name}")
        time.sleep(self.delay_s)

    def RegisterPrefix(self, request, context):  # noqa: N802
        self._enter("RegisterPrefix", context)
        return compute_pb2.RegisterPrefixResponse(prefix_id=PREFIX, num_tokens=len(request.token_ids.ids))

    def Reprefill(self, request, context):  # noqa: N802
        self._enter("Reprefill", context)
        return compute_pb2.ReprefillResponse(token_id=7, text=self.name, policy=request.policy)

    def Generate(self, request, context):  # noqa: N802
        self._enter("Generate", context)
        for index in range(3):
            if self.tokens_then_fail is not None and index == self.tokens_then_fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")
            if index:
                time.sleep(self.token_delay_s)
            yield compute_pb2.GenerateResponse(index=index, token_id=100 + index, text=f"t{index}")
        yield compute_pb2.GenerateResponse(index=3, summary=compute_pb2.ReprefillResponse(token_id=100))

    def GetModelInfo(self, request, context):  # noqa: N802
        self._enter("GetModelInfo", context)
        return compute_pb2.GetModelInfoResponse(name=self.name, num_layers=2, policies=["full"])


@pytest.fixture
def fakes() -> Iterator[list[tuple[str, FakeCompute]]]:
    """Two fake compute servers on loopback: [(address, servicer), ...]."""
    servers, out = [], []
    for name in ("a", "b"):
        fake = FakeCompute(name)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        compute_pb2_grpc.add_ComputeServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        out.append((f"127.0.0.1:{port}", fake))
    yield out
    for server in servers:
        server.stop(None)


def _dead_address() -> str:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_unavailable_is_retried_until_it_succeeds(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.failures = [grpc.StatusCode.UNAVAILABLE] * 2
    with ContiguousKVClient(address, retry=FAST, timeout=10) as client:
        assert client.reprefill(PREFIX, [1, 2]).text == "a"
        fake.failures = [grpc.StatusCode.UNAVAILABLE]
        assert client.register(token_ids=[1, 2, 3]).num_tokens == 3
        fake.failures = [grpc.StatusCode.UNAVAILABLE]
        assert client.model_info().num_layers == 2
    assert fake.calls == ["Reprefill"] * 3 + ["RegisterPrefix"] * 2 + ["GetModelInfo"] * 2


def test_other_errors_are_not_retried_and_leak_no_grpc(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.failures = [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT]
    with ContiguousKVClient(address, retry=FAST, timeout=10) as client:
        with pytest.raises(NotFoundError) as info:
            client.reprefill(PREFIX, [1])
        with pytest.raises(InvalidArgumentError):
            client.reprefill(PREFIX, [1])
    assert fake.calls == ["Reprefill", "Reprefill"]
    err = info.value
    assert err.status == "NOT_FOUND" and "scripted NOT_FOUND" in err.details and not err.retryable
    assert err.__cause__ is None and err.__context__ is None
    assert not isinstance(err, grpc.RpcError) and type(err).__module__.startswith("contiguouskv.client")


def test_attempts_are_capped(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.failures = [grpc.StatusCode.UNAVAILABLE] * 10
    with ContiguousKVClient(address, retry=FAST, timeout=10) as client:
        with pytest.raises(UnavailableError, match="scripted UNAVAILABLE") as info:
            client.reprefill(PREFIX, [1])
    # the server answered UNAVAILABLE itself: no hint that nothing runs at the address
    assert "is a compute server running" not in info.value.details
    assert len(fake.calls) == FAST.max_attempts
    fake.calls.clear()
    with ContiguousKVClient(address, retry=NO_RETRY, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.model_info()
    assert len(fake.calls) == 1


def test_an_address_with_no_server_gets_a_hint_to_start_one() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with ContiguousKVClient(address, retry=NO_RETRY, timeout=10) as client:
        with pytest.raises(UnavailableError, match=f"is a compute server running at {address}"):
            client.model_info()


def test_round_robin_and_failover(fakes: list[tuple[str, FakeCompute]]) -> None:
    (a, fake_a), (b, fake_b) = fakes
    with ContiguousKVClient([a, b], retry=FAST, timeout=10) as client:
        answers = [client.reprefill(PREFIX, [1]).text for _ in range(6)]
    assert answers == ["a", "b"] * 3
    with ContiguousKVClient(f"{_dead_address()},{b}", retry=FAST, timeout=10) as client:
        assert [client.model_info().name for _ in range(4)] == ["b"] * 4  # the dead one is skipped by retries


def test_timeout_bounds_the_call_and_its_retries(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.delay_s = 2.0
    with ContiguousKVClient(address, retry=FAST, timeout=10) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="--timeout"):
            client.reprefill(PREFIX, [1], timeout=0.3)
        assert time.monotonic() - started < 1.5
    fake.delay_s = 0.0
    fake.failures = [grpc.StatusCode.UNAVAILABLE] * 1000
    patient = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05)
    with ContiguousKVClient(address, retry=patient, timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            client.model_info()
        assert time.monotonic() - started < 1.5
    assert 2 <= len(fake.calls) < 100


def test_generate_retries_only_before_the_first_token(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.failures = [grpc.StatusCode.UNAVAILABLE]
    with ContiguousKVClient(address, retry=FAST, timeout=10) as client:
        tokens = list(client.generate(PREFIX, [1], max_new_tokens=2))
        assert [t.token_id for t in tokens] == [100, 101, 102] and tokens[0].index == 0
        assert fake.calls == ["Generate", "Generate"]
        fake.calls.clear()
        fake.tokens_then_fail = 1
        got = []
        with pytest.raises(UnavailableError, match="mid-stream") as info:
            for token in client.generate(PREFIX, [1], max_new_tokens=2):
                got.append(token.token_id)
        assert got == [100] and fake.calls == ["Generate"]  # never repeated: tokens were delivered
        # the server was talking: the hint says so, not "start a server" nor a TLS mismatch
        assert "after 1 token(s) had arrived" in info.value.details and "TLS" not in info.value.details


async def test_async_client_retries_round_robin_and_streams(fakes: list[tuple[str, FakeCompute]]) -> None:
    (a, fake_a), (b, fake_b) = fakes
    fake_a.failures = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncContiguousKVClient([a, b], retry=FAST, timeout=10) as client:
        # a fails once, the retry goes to b; then a, b in turn
        assert [(await client.reprefill(PREFIX, [1])).text for _ in range(3)] == ["b", "a", "b"]
        tokens = [t.token_id async for t in client.generate(PREFIX, [1], max_new_tokens=2)]
        assert tokens == [100, 101, 102]
        fake_b.failures = [grpc.StatusCode.NOT_FOUND]
        with pytest.raises(NotFoundError):
            await client.reprefill(PREFIX, [1])
        with pytest.raises(DeadlineExceededError):
            fake_a.delay_s = fake_b.delay_s = 1.0
            await client.model_info(timeout=0.2)


def test_every_status_has_its_error_class() -> None:
    for code in grpc.StatusCode:
        if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
            continue
        cls = ERRORS_BY_STATUS[code.name]
        assert cls.status == code.name and issubclass(cls, ContiguousKVError)
        assert cls.__name__ in sdk.__all__, cls.__name__
    assert issubclass(InvalidArgumentError, ValueError)
    assert [name for name, cls in ERRORS_BY_STATUS.items() if cls.retryable] == ["UNAVAILABLE"]


def test_retry_policy_and_addresses_are_checked() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (9, 0.4)):
        assert all(0 <= policy.backoff_s(retry) <= ceiling for _ in range(50))
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="timeout"):
        Deadline(0)
    assert parse_addresses(" h1:1 , h2:2 ") == ("h1:1", "h2:2")
    assert parse_addresses(["h1:1"]) == ("h1:1",)
    for bad in ("", "nohost", "h:port", []):
        with pytest.raises(InvalidArgumentError, match="address"):
            parse_addresses(bad)


def test_results_are_frozen(fakes: list[tuple[str, FakeCompute]]) -> None:
    import dataclasses

    with ContiguousKVClient(fakes[0][0], timeout=10) as client:
        result = client.reprefill(PREFIX, [1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.token_id = 3  # type: ignore[misc]


@pytest.mark.skipif(shutil.which("mypy", path=str(Path(sys.executable).parent)) is None, reason="mypy not installed")
def test_client_package_is_mypy_strict_clean() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "typecheck_client.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


def test_bad_arguments_fail_before_any_call_naming_the_field() -> None:
    with ContiguousKVClient("127.0.0.1:1", retry=NO_RETRY, timeout=5) as client:  # nothing listens there
        calls = [
            (lambda: client.reprefill(PREFIX, [1], max_new_tokens=-1), "max_new_tokens: must be an integer"),
            (lambda: client.reprefill(PREFIX, [1, -2]), "query: token id -2 at position 1"),
            (lambda: client.reprefill(PREFIX, [1, 2.5]), "query: token id 2.5 at position 1"),  # type: ignore[list-item]
            (lambda: client.reprefill(PREFIX, [1], period=-1), "period: must be"),
            (lambda: client.register(token_ids=[3, 1 << 32]), "token_ids: token id 4294967296"),
            (lambda: client.register("text", token_ids=[1]), "exactly one of text or token_ids"),
            (lambda: client.generate(PREFIX, [1], max_new_tokens=-3), "max_new_tokens"),  # before iterating
            (lambda: client.reprefill(PREFIX, [1], timeout=0), "timeout: must be > 0"),  # not "the default"
            (lambda: client.generate(PREFIX, [1], timeout=0), "timeout: must be > 0"),
            (lambda: client.reprefill(PREFIX, [1], timeout="5"), "timeout: must be a number"),  # type: ignore[arg-type]
            (lambda: client.reprefill(123, [1]), "prefix_id: must be a string"),  # type: ignore[arg-type]
            (lambda: client.reprefill(PREFIX, None), "query: give text"),  # type: ignore[arg-type]
            (lambda: client.reprefill(PREFIX, [1], budget="x"), "budget: must be a number"),  # type: ignore[arg-type]
            (lambda: client.register(42), "text: must be a string"),  # type: ignore[arg-type]
            (lambda: ContiguousKVClient(53202), "address: give"),  # type: ignore[arg-type]
            (lambda: ContiguousKVClient("h:1", retry=None), "retry: give a RetryPolicy"),  # type: ignore[arg-type]
        ]
        for call, message in calls:
            with pytest.raises(InvalidArgumentError, match=message) as info:
                call()
            assert info.value.status == "INVALID_ARGUMENT" and isinstance(info.value, ValueError)
    # integers of any integer type pass (numpy's, as a tokenizer may return them)
    import numpy  # installed with torch

    request = _wire.reprefill_request(PREFIX, numpy.array([5, 6], dtype=numpy.int64), "full", None,
                                      numpy.int32(2), None, None)
    assert list(request.token_ids.ids) == [5, 6] and request.max_new_tokens == 2


def test_a_closed_client_raises_sdk_errors(fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    client = ContiguousKVClient(address, timeout=10)
    client.close()
    for call in (lambda: client.reprefill(PREFIX, [1]), lambda: client.generate(PREFIX, [1]), client.model_info):
        with pytest.raises(FailedPreconditionError, match="client is closed"):
            call()


async def test_async_client_closed_before_or_during_a_stream_raises_sdk_errors(
        fakes: list[tuple[str, FakeCompute]]) -> None:
    address, fake = fakes[0]
    fake.token_delay_s = 0.5
    client = AsyncContiguousKVClient(address, timeout=10)
    first = asyncio.Event()

    async def read() -> list[int]:
        got = []
        async for token in client.generate(PREFIX, [1], max_new_tokens=2):
            got.append(token.token_id)
            first.set()
        return got

    reader = asyncio.create_task(read())
    await first.wait()
    await client.close()  # another task closes the client while the reader waits for its next token
    with pytest.raises(ContiguousKVError) as info:  # an SDK error, not a stray CancelledError
        await reader
    assert info.value.status == "CANCELLED", info.value
    for call in (client.model_info, lambda: client.reprefill(PREFIX, [1])):
        with pytest.raises(FailedPreconditionError, match="client is closed"):
            await call()
    with pytest.raises(FailedPreconditionError, match="client is closed"):
        client.generate(PREFIX, [1])


def test_a_cache_shard_the_compute_server_cannot_reach_is_not_blamed_on_the_compute_server() -> None:
    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:  # what a register with a shard down reports
            return ("prefix ab (contiguous): committed on 0 of 2 replicas (any still writing finish in the "
                    "background), the write quorum is 2: cache server 127.0.0.1:7: failed to connect to all "
                    "addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:7: Connection refused")

    error = _wire.to_error(Refused(), "127.0.0.1:9")
    assert isinstance(error, UnavailableError)
    assert "cannot reach that cache server" in error.details and "is a compute server running" not in error.details
