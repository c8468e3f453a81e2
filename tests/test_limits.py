"""Every limit in the config refuses with a status and a message that names it; the servers go on.

One cache and one compute server (random:tiny) with small limits from a config file: prefix and
query tokens, new tokens, message size, calls in flight per client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from contiguouskv import launch
from contiguouskv.client import (
    NO_RETRY, ContiguousKVClient, InvalidArgumentError, ResourceExhaustedError,
)

LIMITS = {"max_prefix_tokens": 300, "max_query_tokens": 16, "max_new_tokens": 8,
          "max_message_bytes": 1 << 20, "max_streams_per_client": 1}


@pytest.fixture(scope="module")
def compute(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("limits")
    config = tmp / "compute.json"
    config.write_text(json.dumps(LIMITS))
    # room for the one 200-token prefix below (499,712 bytes) and not for a second one
    with launch.cache_server(tmp / "store", "--max-store-bytes", "800000") as cache, \
            launch.compute_server("random:tiny", cache.address, "--threads", "1", "--config", str(config)) as server:
        yield server.address


def _client(address: str) -> ContiguousKVClient:
    return ContiguousKVClient(address, timeout=60, retry=NO_RETRY)


@pytest.fixture(scope="module")
def prefix_id(compute: str) -> str:
    with _client(compute) as client:
        return client.register(token_ids=list(range(3, 203))).prefix_id


@pytest.mark.parametrize("call, status, names", [
    (lambda c, p: c.register(token_ids=list(range(3, 404))), InvalidArgumentError, "max_prefix_tokens"),
    (lambda c, p: c.reprefill(p, list(range(3, 23))), InvalidArgumentError, "max_query_tokens"),
    (lambda c, p: c.reprefill(p, [5, 6], max_new_tokens=9), InvalidArgumentError, "max_new_tokens"),
    (lambda c, p: c.register("x " * 600_000), ResourceExhaustedError, "larger than max"),
    # a full store is the cache's refusal, passed on as such: not UNAVAILABLE, which clients retry
    (lambda c, p: c.register(token_ids=list(range(4, 204))), ResourceExhaustedError, "max_store_bytes 800000"),
])
def test_each_limit_is_named_in_its_refusal(compute: str, prefix_id: str, call: object, status: type,
                                            names: str) -> None:
    with _client(compute) as client:
        with pytest.raises(status, match=names):
            call(client, prefix_id)  # type: ignore[operator]
        assert client.reprefill(prefix_id, [5, 6]).token_id >= 0  # and the server still answers


def test_calls_in_flight_per_client_are_limited(compute: str, prefix_id: str) -> None:
    """With max_streams_per_client 1, a second concurrent call from this machine is refused, not queued."""
    with _client(compute) as client:
        started, stop = threading.Event(), threading.Event()
        outcome: list[BaseException | None] = []

        def generate() -> None:
            try:
                for _ in client.generate(prefix_id, [5, 6], max_new_tokens=8):
                    started.set()
                    stop.wait(30)  # hold the stream open
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)
                started.set()

        worker = threading.Thread(target=generate)
        worker.start()
        assert started.wait(60)
        try:
            with pytest.raises(ResourceExhaustedError, match=r"max_streams_per_client \(1\)"):
                client.reprefill(prefix_id, [5, 6])
        finally:
            stop.set()
            worker.join(60)
        assert outcome == [None]
        assert client.reprefill(prefix_id, [5, 6]).token_id >= 0  # the slot is free again
