"""Fuzzing both servers over the wire (issue 8, item 3).

A real cache server and a real compute server (``random:tiny``, one torch thread) run as
subprocesses; a few prefixes are registered first (two through the compute server, one with the
``impress`` layout, and one raw object stored straight on the cache server). Then:

- every RPC of ``CacheService`` and ``ComputeService`` gets requests drawn by hypothesis from
  strategies built generically from the message descriptors (:func:`messages` walks
  ``DESCRIPTOR.fields`` and oneofs), mixed with hostile values (``../x``, ``/``, NUL, unicode,
  empty and 10 KB strings, integers at 0, -1, 2^31, 2^32, 2^63-1, 2^64-1, NaN and infinities,
  empty and huge repeated fields) and with valid names (registered prefix ids, layouts, regions,
  policy names), so requests also get past the first checks into wrong combinations. Every call
  must end with OK or a status that blames the request (INVALID_ARGUMENT, NOT_FOUND,
  FAILED_PRECONDITION, RESOURCE_EXHAUSTED, OUT_OF_RANGE), never UNKNOWN (an unhandled exception),
  INTERNAL, UNAVAILABLE or a timeout; a Fetch read's in-band error code likewise; records served
  of a stored object must be its bytes;
- raw garbage goes to both ports over TCP: random bytes, the HTTP/2 preface then garbage,
  truncated frames, a HEADERS frame cut mid-way, frames with huge declared lengths, connections
  opened and dropped (also with RST);
- last, both processes are alive, health says SERVING, a Re-Prefill gives the same token and
  logits as before the fuzzing, every file of the objects committed before is unchanged (SHA-256),
  every record of them reads back the same through Fetch, and neither log has a traceback.

DeletePrefix is fuzzed with prefix ids of its own (the stored prefixes are not deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CacheProc, start_cache_server
from contiguouskv import launch
from contiguouskv.client import ContiguousKVClient
from contiguouskv.compute_server.layouts.contiguous import LAYOUT_VERSION
from contiguouskv.compute_server.policies.registry import BUILTIN_POLICIES
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc, compute_pb2, compute_pb2_grpc

POLICY_NAMES = tuple(policy.name for policy in BUILTIN_POLICIES)

MODEL = "random:tiny"
LAYOUT = "contiguous-c16-g8"
RPC_TIMEOUT_S = 30.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
FD = FieldDescriptor

# Statuses that blame the request; anything else (UNKNOWN, INTERNAL, UNAVAILABLE, ...) is a bug.
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.OUT_OF_RANGE}
CLEAN_CODES = {code.value[0] for code in CLEAN}

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# -- hostile values ----------------------------------------------------------------------------

HOSTILE_STRINGS = ["", "../x", "/", "..", "a/b", "a\x00b", "\x00", ".tmp-x", "x" * 128, "x" * 129,
                   "x" * 10240, "é" * 5000, "漢字🙂", "\u202e", " ", "\n", "%s%n{}", "objects"]
EXTREME_INTS = [0, 1, 2, 3, -1, -(2**31), 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**63,
                2**64 - 1]
INT_RANGES = {FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_UINT32: (0, 2**32 - 1),
              FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1)}
EXTREME_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, -1.0, math.nan, math.inf, -math.inf, 1e-300, 5e-324]
HUGE_LIST_LENGTHS = [1000, 1_100_000]  # the second is past the cache's 2^20 indices per read


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in EXTREME_INTS if lo <= v <= hi]),
                     st.integers(max(lo, 0), 64), st.integers(lo, hi))


def _scalar(field: FieldDescriptor, pool: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    """Values for one (non-message) field: hostile ones, random ones and ``pool[field.name]``."""
    t = field.type
    if t in INT_RANGES:
        return _ints(*INT_RANGES[t])
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        width = 64 if t == FD.TYPE_DOUBLE else 32
        return st.sampled_from(EXTREME_FLOATS) | st.floats(width=width)
    if t == FD.TYPE_STRING:
        known = pool.get(field.name, [])
        return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40),
                         *([st.sampled_from(known)] * 2 if known else []))
    if t == FD.TYPE_BYTES:
        return st.sampled_from([b"", b"\x00" * 4096, b"\xff" * (1 << 20)]) | st.binary(max_size=64)
    raise AssertionError(f"no strategy for field {field.full_name} of type {t}")


def _field(field: FieldDescriptor, pool: dict[str, list[str]], depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        one: st.SearchStrategy[Any] = messages(field.message_type, pool, depth + 1)
    else:
        one = _scalar(field, pool)
    if not field.is_repeated:
        return one
    small = st.lists(one, max_size=6)
    if field.type in (FD.TYPE_MESSAGE, FD.TYPE_STRING, FD.TYPE_BYTES):
        lengths = [200]  # big elements: fewer of them, to stay far below the 64 MiB message limit
    else:
        lengths = HUGE_LIST_LENGTHS if depth == 0 else [1000]
    huge = st.tuples(st.sampled_from(lengths), one).map(lambda t: [t[1]] * t[0])
    return st.integers(0, 7).flatmap(lambda k: huge if k == 0 else small)


def messages(descriptor: Descriptor, pool: dict[str, list[str]] | None = None,
             depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``: each plain field set or not, at most one field of each oneof.

    ``pool`` maps a field name to valid values mixed into its strings (e.g. stored prefix ids).
    """
    pool = pool or {}
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    plain = {f.name: _field(f, pool, depth) for f in descriptor.fields if f.containing_oneof is None}
    parts: list[st.SearchStrategy[dict[str, Any]]] = [st.fixed_dictionaries({}, optional=plain)]
    for oneof in descriptor.oneofs:
        choices = [st.just({})] + [_field(f, pool, depth).map(lambda v, n=f.name: {n: v}) for f in oneof.fields]
        parts.append(st.one_of(choices))

    def build(dicts: tuple[dict[str, Any], ...]) -> Message:
        return cls(**{k: v for d in dicts for k, v in d.items()})

    return st.tuples(*parts).map(build)


# -- the servers and what they stored before the fuzzing ---------------------------------------

@dataclasses.dataclass
class Stored:
    """Servers plus what was committed before the fuzzing, to compare with after it."""

    cache: CacheProc
    compute: launch.ServiceProcess
    cache_channel: grpc.Channel
    compute_channel: grpc.Channel
    prefix_ids: list[str]
    objects: list[tuple[str, str]]  # (prefix_id, layout) of every stored object
    layouts: list[str]
    regions: list[str]
    files: dict[Path, str]  # sha256 of every file under objects/
    records: dict[tuple[str, str, str], str]  # (prefix, layout, region) -> sha256 of all its records
    reprefill: compute_pb2.ReprefillResponse
    reprefill_request: compute_pb2.ReprefillRequest

    @property
    def cache_stub(self) -> cache_pb2_grpc.CacheServiceStub:
        return cache_pb2_grpc.CacheServiceStub(self.cache_channel)

    @property
    def compute_stub(self) -> compute_pb2_grpc.ComputeServiceStub:
        return compute_pb2_grpc.ComputeServiceStub(self.compute_channel)

    def pool(self) -> dict[str, list[str]]:
        return {"prefix_id": self.prefix_ids, "layout": self.layouts, "region": self.regions,
                "name": self.regions, "policy": [*POLICY_NAMES, "FULL", "full ", "h2o\x00"],
                "extra_layouts": ["impress", "contiguous"]}


def file_hashes(root: Path) -> dict[Path, str]:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "objects").rglob("*")) if p.is_file()}


def record_hashes(stub: cache_pb2_grpc.CacheServiceStub) -> dict[tuple[str, str, str], str]:
    """SHA-256 of every record of every stored object, read back through Fetch."""
    out = {}
    for m in stub.ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=RPC_TIMEOUT_S).manifests:
        reads = [cache_pb2.FetchRequest(open=cache_pb2.FetchOpen(prefix_id=m.prefix_id, layout=m.layout))]
        reads += [cache_pb2.FetchRequest(read=cache_pb2.FetchRead(tag=i, region=r.name, indices=range(r.num_records)))
                  for i, r in enumerate(m.regions)]
        digests = [hashlib.sha256() for _ in m.regions]
        for response in stub.Fetch(iter(reads), timeout=RPC_TIMEOUT_S):
            assert response.error_code == 0, response.error_message
            digests[response.tag].update(response.data)
        out.update({(m.prefix_id, m.layout, r.name): d.hexdigest() for r, d in zip(m.regions, digests)})
    return out


def _raw_object() -> list[cache_pb2.PutPrefixRequest]:
    rng = random.Random(7)
    regions = [("a", 5, 4096), ("b/c", 3, 100), ("empty", 0, 8)]
    out = [cache_pb2.PutPrefixRequest(header=cache_pb2.PutPrefixHeader(
        prefix_id="raw-0", layout="raw", metadata=b"meta",
        regions=[cache_pb2.RegionSpec(name=n, num_records=k, record_size=s) for n, k, s in regions]))]
    out += [cache_pb2.PutPrefixRequest(data=cache_pb2.PutPrefixData(region=n, data=rng.randbytes(k * s)))
            for n, k, s in regions if k]
    return out + [cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cache = start_cache_server(tmp / "root")
    compute = launch.compute_server(MODEL, cache.address, "--device", "cpu", "--dtype", "float32",
                                    "--threads", "1", log_path=tmp / "compute.log")
    try:
        compute.wait_ready()
        with ContiguousKVClient(compute.address, timeout=120) as client:
            first = client.register(token_ids=[(7 * i) % 512 for i in range(100)])
            second = client.register(token_ids=[(11 * i + 3) % 512 for i in range(300)], extra_layouts=["impress"])
        cache_channel = grpc.insecure_channel(cache.address, options=OPTIONS)
        compute_channel = grpc.insecure_channel(compute.address, options=OPTIONS)
        cache_stub = cache_pb2_grpc.CacheServiceStub(cache_channel)
        cache_stub.PutPrefix(iter(_raw_object()), timeout=RPC_TIMEOUT_S)
        manifests = cache_stub.ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=RPC_TIMEOUT_S).manifests
        request = compute_pb2.ReprefillRequest(prefix_id=second.prefix_id, token_ids=compute_pb2.TokenIds(ids=[1, 2, 3]),
                                               policy="contiguous", budget=0.5, return_logits=True, max_new_tokens=3)
        baseline = compute_pb2_grpc.ComputeServiceStub(compute_channel).Reprefill(request, timeout=RPC_TIMEOUT_S)
        yield Stored(cache, compute, cache_channel, compute_channel,
                     prefix_ids=[first.prefix_id, second.prefix_id, "raw-0"],
                     objects=[(m.prefix_id, m.layout) for m in manifests],
                     layouts=sorted({m.layout for m in manifests}),
                     regions=sorted({r.name for m in manifests for r in m.regions}),
                     files=file_hashes(cache.root), records=record_hashes(cache_stub),
                     reprefill=baseline, reprefill_request=request)
        cache_channel.close()
        compute_channel.close()
    finally:
        compute.stop()
        cache.stop()


def _check(call: Callable[[], Any], what: Message | str) -> Any:
    """Run ``call``; a non-clean status fails the test with the request that caused it."""
    try:
        return call()
    except grpc.RpcError as err:
        code, details = err.code(), err.details()  # type: ignore[attr-defined]
        # the client's own refusals ("CLIENT: ...", a trailer too big: "Stream removed") hide the status
        assert code in CLEAN and not details.startswith(("CLIENT:", "Stream removed")), \
            f"{code} {details!r} for {str(what)[:2000]}"
        return None


# -- CacheService ------------------------------------------------------------------------------

CACHE_UNARY = ["GetManifest", "ListPrefixes", "GetStats", "ReportAttention", "DeletePrefix"]


def aimed_at(requests: st.SearchStrategy[Message], objects: Sequence[tuple[str, str]]) -> st.SearchStrategy[Message]:
    """``requests``, half of them naming a stored object (prefix_id and layout that go together)."""
    def aim(request: Message, key: tuple[str, str] | None) -> Message:
        if key is not None:
            for name, value in zip(("prefix_id", "layout"), key):
                if name in request.DESCRIPTOR.fields_by_name:
                    setattr(request, name, value)
        return request

    return st.builds(aim, requests, st.none() | st.sampled_from(objects))


@pytest.mark.parametrize("rpc", CACHE_UNARY)
def test_cache_unary_rpcs(stored: Stored, rpc: str) -> None:
    method = getattr(stored.cache_stub, rpc)
    request_cls = getattr(cache_pb2, f"{rpc}Request")
    pool, objects = stored.pool(), stored.objects
    if rpc == "DeletePrefix":  # its own ids: the stored prefixes stay
        pool, objects = {**pool, "prefix_id": ["victim-1", "victim-2"]}, [("victim-1", "raw")]

    @FUZZ
    @given(request=aimed_at(messages(request_cls.DESCRIPTOR, pool), objects))
    def run(request: Message) -> None:
        _check(lambda: method(request, timeout=RPC_TIMEOUT_S), request)

    run()


def _fetch_requests(pool: dict[str, list[str]],
                   objects: Sequence[tuple[str, str]]) -> st.SearchStrategy[list[cache_pb2.FetchRequest]]:
    valid_open = st.builds(lambda key, b: cache_pb2.FetchRequest(open=cache_pb2.FetchOpen(
        prefix_id=key[0], layout=key[1], max_batch_bytes=b)), st.sampled_from(objects), _ints(0, 2**64 - 1))
    any_request = messages(cache_pb2.FetchRequest.DESCRIPTOR, pool)
    return st.tuples(valid_open | any_request, st.lists(any_request, max_size=8)).map(lambda t: [t[0], *t[1]])


def test_cache_fetch(stored: Stored) -> None:
    stub = stored.cache_stub
    raw_records = {("raw-0", "raw", r.data.region): r.data.data for r in _raw_object() if r.HasField("data")}
    sizes = {"a": 4096, "b/c": 100}

    @FUZZ
    @given(requests=_fetch_requests(stored.pool(), stored.objects))
    def run(requests: list[cache_pb2.FetchRequest]) -> None:
        responses = _check(lambda: list(stub.Fetch(iter(requests), timeout=RPC_TIMEOUT_S)), requests) or []
        opened = requests[0].open
        for r in responses:
            assert r.error_code in CLEAN_CODES, f"{r.error_code} {r.error_message!r} for {str(requests)[:2000]}"
            whole = raw_records.get((opened.prefix_id, opened.layout, r.region))
            if whole is not None and r.indices:  # records of the raw object are its bytes
                size = sizes[r.region]
                assert r.data == b"".join(whole[i * size:(i + 1) * size] for i in r.indices)

    run()


def _put_requests(pool: dict[str, list[str]],
                 objects: Sequence[tuple[str, str]]) -> st.SearchStrategy[list[cache_pb2.PutPrefixRequest]]:
    header = aimed_at(messages(cache_pb2.PutPrefixHeader.DESCRIPTOR, pool), objects).map(
        lambda h: cache_pb2.PutPrefixRequest(header=h))
    any_request = messages(cache_pb2.PutPrefixRequest.DESCRIPTOR, pool)
    commit = cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())
    body = st.lists(any_request, max_size=6)
    return st.tuples(header | any_request, body, st.booleans()).map(
        lambda t: [t[0], *t[1], *([commit] if t[2] else [])])


def test_cache_put_prefix(stored: Stored) -> None:
    stub = stored.cache_stub

    @FUZZ
    @given(requests=_put_requests(stored.pool(), stored.objects))
    def run(requests: list[cache_pb2.PutPrefixRequest]) -> None:
        _check(lambda: stub.PutPrefix(iter(requests), timeout=RPC_TIMEOUT_S), requests)

    run()


# -- ComputeService ----------------------------------------------------------------------------

def test_compute_register_prefix(stored: Stored) -> None:
    stub = stored.compute_stub

    @FUZZ
    @given(request=messages(compute_pb2.RegisterPrefixRequest.DESCRIPTOR, stored.pool()))
    def run(request: compute_pb2.RegisterPrefixRequest) -> None:
        _check(lambda: stub.RegisterPrefix(request, timeout=RPC_TIMEOUT_S), request)

    run()


def _reprefill_requests(pool: dict[str, list[str]]) -> st.SearchStrategy[compute_pb2.ReprefillRequest]:
    """Generic requests, half of them with a stored prefix id and a short valid query."""
    generic = messages(compute_pb2.ReprefillRequest.DESCRIPTOR, pool)
    compute_ids = [p for p in pool["prefix_id"] if len(p) == 32]

    def aim(request: compute_pb2.ReprefillRequest, prefix_id: str, query: list[int]) -> compute_pb2.ReprefillRequest:
        request.prefix_id = prefix_id
        request.token_ids.ids[:] = query
        if request.max_new_tokens > 64:
            request.max_new_tokens %= 64  # keeps the run short; out-of-range counts stay in `generic`
        return request

    aimed = st.builds(aim, generic, st.sampled_from(compute_ids), st.lists(st.integers(0, 511), min_size=1, max_size=8))
    small = st.none() | st.integers(0, 9)
    plausible = st.builds(  # valid fields in every combination, e.g. h2o without the impress layout
        lambda p, q, policy, budget, n, period, sub, logits, recall: compute_pb2.ReprefillRequest(
            prefix_id=p, token_ids=compute_pb2.TokenIds(ids=q), policy=policy, budget=budget, max_new_tokens=n,
            period=period, sub_period=sub, return_logits=logits, evaluate_recall=recall),
        st.sampled_from(compute_ids), st.lists(st.integers(0, 511), min_size=1, max_size=8),
        st.sampled_from(["", *POLICY_NAMES]), st.sampled_from([None, 1.0, 0.5, 0.01, 1e-9, 5e-324]),
        st.integers(0, 8), small, small, st.booleans(), st.booleans())
    return st.one_of(generic, aimed, plausible)


def test_compute_reprefill(stored: Stored) -> None:
    stub = stored.compute_stub

    @FUZZ
    @given(request=_reprefill_requests(stored.pool()))
    def run(request: compute_pb2.ReprefillRequest) -> None:
        _check(lambda: stub.Reprefill(request, timeout=RPC_TIMEOUT_S), request)

    run()


def test_compute_generate(stored: Stored) -> None:
    stub = stored.compute_stub

    @settings(FUZZ, max_examples=30)
    @given(inner=_reprefill_requests(stored.pool()), wrap=st.booleans())
    def run(inner: compute_pb2.ReprefillRequest, wrap: bool) -> None:
        request = compute_pb2.GenerateRequest(request=inner) if wrap else compute_pb2.GenerateRequest()
        replies = _check(lambda: list(stub.Generate(request, timeout=RPC_TIMEOUT_S)), request)
        if replies:
            assert replies[-1].HasField("summary")
            assert [r.index for r in replies[:-1]] == list(range(len(replies) - 1))

    run()


def test_compute_get_model_info(stored: Stored) -> None:
    stub = stored.compute_stub

    @settings(FUZZ, max_examples=10)
    @given(request=messages(compute_pb2.GetModelInfoRequest.DESCRIPTOR))
    def run(request: compute_pb2.GetModelInfoRequest) -> None:
        assert stub.GetModelInfo(request, timeout=RPC_TIMEOUT_S).name == MODEL

    run()


@pytest.mark.parametrize("name", ["x" * 10240, "é" * 5000, "漢" * 4000])
def test_long_names_keep_their_status(stored: Stored, name: str) -> None:
    """Regression: a rejected 10 KB name used to be echoed whole in the status message, whose
    trailer the client then dropped (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit")."""
    put = [cache_pb2.PutPrefixRequest(header=cache_pb2.PutPrefixHeader(
               prefix_id="long-1", layout="l", regions=[cache_pb2.RegionSpec(name="a", num_records=1, record_size=1)])),
           cache_pb2.PutPrefixRequest(data=cache_pb2.PutPrefixData(region=name, data=b"x"))]
    calls = [lambda: stored.cache_stub.GetManifest(cache_pb2.GetManifestRequest(prefix_id=name, layout="l")),
             lambda: stored.cache_stub.ListPrefixes(cache_pb2.ListPrefixesRequest(prefix_id=name)),
             lambda: stored.cache_stub.PutPrefix(iter(put)),
             lambda: stored.compute_stub.Reprefill(compute_pb2.ReprefillRequest(prefix_id=name))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()  # type: ignore[attr-defined]
        assert 0 < len(info.value.details().encode()) <= 2100  # type: ignore[attr-defined]


def test_every_rpc_is_fuzzed() -> None:
    """A new RPC in the protos must get a test here."""
    fuzzed = {*CACHE_UNARY, "Fetch", "PutPrefix", "RegisterPrefix", "Reprefill", "Generate", "GetModelInfo"}
    services = [cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
                compute_pb2.DESCRIPTOR.services_by_name["ComputeService"]]
    assert {m.name for s in services for m in s.methods} == fuzzed


# -- raw bytes on the ports --------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, DATA, SETTINGS = 0x1, 0x0, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """One HTTP/2 frame; ``length`` may lie about the payload's size."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (lengths < 127)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def header_block(path: bytes) -> bytes:
    return (b"\x83\x86" + _literal(b":path", path) + _literal(b":authority", b"x")  # POST, http
            + _literal(b"content-type", b"application/grpc") + _literal(b"te", b"trailers"))


GRPC_PATHS = [b"/contiguouskv.v1.CacheService/GetStats", b"/contiguouskv.v1.CacheService/Fetch",
              b"/contiguouskv.v1.ComputeService/Reprefill", b"/grpc.health.v1.Health/Check", b"/nope/Nope"]


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Bytes a broken or hostile client might send on a fresh connection."""
    noise = draw(st.binary(max_size=2048))
    block = header_block(draw(st.sampled_from(GRPC_PATHS)))
    hello = PREFACE + frame(SETTINGS, 0, 0, b"")
    kind = draw(st.sampled_from(["noise", "preface+noise", "truncated frame", "headers cut",
                                 "headers then noise data", "huge length", "bad hpack", "nothing"]))
    if kind == "noise":
        return noise
    if kind == "preface+noise":
        return PREFACE + noise
    if kind == "truncated frame":
        whole = frame(draw(st.integers(0, 9)), draw(st.integers(0, 255)), draw(st.integers(0, 2**31 - 1)), noise)
        return hello + whole[: draw(st.integers(0, len(whole)))]
    if kind == "headers cut":  # a HEADERS frame that ends mid-way, with or without END_HEADERS
        flags = draw(st.sampled_from([0, END_HEADERS]))
        return hello + frame(HEADERS, flags, 1, block[: draw(st.integers(0, len(block)))], length=len(block))
    if kind == "headers then noise data":  # a real call whose message is garbage, maybe cut short
        message = b"\x00" + struct.pack(">I", draw(st.sampled_from([len(noise), 2**31, 2**32 - 1]))) + noise
        return hello + frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, message)
    if kind == "huge length":
        return hello + frame(draw(st.integers(0, 9)), 0, 1, noise, length=2**24 - 1)
    if kind == "bad hpack":
        return hello + frame(HEADERS, END_HEADERS | END_STREAM, 1, noise)
    return b""


def _send_raw(port: int, payload: bytes, reset: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if reset:  # close with RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            sock.sendall(payload)
            if not reset:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):  # until the server closes (GOAWAY) or times out
                    pass
        except OSError:  # the server may reset the connection first
            pass


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_raw_garbage_on_both_ports(stored: Stored) -> None:
    ports = [stored.cache.port, int(stored.compute.address.rsplit(":", 1)[1])]

    @settings(FUZZ, max_examples=80)
    @given(payload=garbage(), which=st.sampled_from(ports), reset=st.booleans())
    def run(payload: bytes, which: int, reset: bool) -> None:
        _send_raw(which, payload, reset)

    run()
    # many connections at once, opened and dropped without a byte
    for port in ports:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(64)]
        for s in socks:
            s.close()
    assert _serving(stored.cache.address) and _serving(stored.compute.address)


def test_unparsable_request_stream_messages_get_invalid_argument(stored: Stored) -> None:
    """A Fetch or PutPrefix stream whose message is not a valid protobuf reaches our handler (not
    grpc's): it answers INVALID_ARGUMENT, first message or later. Regression: the DecodeError
    escaped the handler (status UNKNOWN and a traceback in the cache server's log)."""
    good = cache_pb2.FetchRequest(open=cache_pb2.FetchOpen(prefix_id=stored.prefix_ids[0], layout=LAYOUT))
    with grpc.insecure_channel(stored.cache.address, options=OPTIONS) as channel:
        for method, messages in (("Fetch", [b"\xff\xff\xff\xff"]), ("Fetch", [good.SerializeToString(), b"\x0a\xff"]),
                                 ("PutPrefix", [b"\x12\x80"])):
            call = channel.stream_stream(f"/contiguouskv.v1.CacheService/{method}")  # raw bytes both ways
            with pytest.raises(grpc.RpcError) as err:
                for _ in call(iter(messages), timeout=RPC_TIMEOUT_S):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert "could not be parsed" in (err.value.details() or ""), err.value.details()
    assert _serving(stored.cache.address)


# -- after the fuzzing -------------------------------------------------------------------------

def test_servers_and_data_survive_the_fuzzing(stored: Stored) -> None:
    assert stored.cache.proc.poll() is None and stored.compute.proc.poll() is None
    assert _serving(stored.cache.address) and _serving(stored.compute.address)
    again = stored.compute_stub.Reprefill(stored.reprefill_request, timeout=RPC_TIMEOUT_S)
    before = stored.reprefill
    assert again.token_id == before.token_id and list(again.generated_ids) == list(before.generated_ids)
    assert list(again.logits) == list(before.logits) and len(before.logits) == 512
    files = file_hashes(stored.cache.root)
    assert {p: files.get(p) for p in stored.files} == stored.files
    records = record_hashes(stored.cache_stub)
    assert {k: records.get(k) for k in stored.records} == stored.records
    for log in (stored.cache.log(), stored.compute.log_path.read_text(errors="replace")):
        assert not unexpected_tracebacks(log), unexpected_tracebacks(log)


def unexpected_tracebacks(log: str) -> list[str]:
    """Tracebacks in a server log through Python code; grpc's own reports of raw garbage (a call
    whose message it could not parse, a status it could not send to a client gone away) have only
    frames of grpc's compiled core and are left out."""
    blocks = re.findall(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", log, flags=re.M)
    return [b for b in blocks if re.search(r'^  File "/', b, flags=re.M)]


def test_junk_objects_under_compute_layout_names(stored: Stored) -> None:
    """A raw cache client may commit anything under a compute layout's name: Re-Prefill says the
    stored object is unreadable (FAILED_PRECONDITION). Regression: JSON that is not an object, or
    an object without the layout's fields, failed inside the compute server (INTERNAL), and bytes
    that are not JSON came back as INVALID_ARGUMENT with only the JSON parser's message."""
    impress = next(l for l in stored.layouts if l.startswith("impress"))
    header = f'"layout": "contiguous", "version": {LAYOUT_VERSION}'.encode()
    cases = [("0" * 32, LAYOUT, b"junk", POLICY_NAMES), ("1" * 32, LAYOUT, b"{" + header + b"}", POLICY_NAMES),
             ("2" * 32, LAYOUT, b"[]", POLICY_NAMES),
             ("3" * 32, LAYOUT, b"{" + header + b', "num_tokens": "x", "num_layers": null, "num_kv_heads": 1, '
              b'"head_dim": 1, "dtype": 5, "chunk_size": 0, "group_size": -1}', POLICY_NAMES),
             (stored.prefix_ids[0], impress, b"junk", ("h2o", "impress"))]  # registered without impress
    for prefix_id, layout, metadata, policies in cases:
        stored.cache_stub.PutPrefix(iter([
            cache_pb2.PutPrefixRequest(header=cache_pb2.PutPrefixHeader(prefix_id=prefix_id, layout=layout,
                                                                        metadata=metadata)),
            cache_pb2.PutPrefixRequest(commit=cache_pb2.PutPrefixCommit())]), timeout=RPC_TIMEOUT_S)
        for policy in policies:
            request = compute_pb2.ReprefillRequest(prefix_id=prefix_id, token_ids=compute_pb2.TokenIds(ids=[1]),
                                                   policy=policy)
            with pytest.raises(grpc.RpcError) as info:
                stored.compute_stub.Reprefill(request, timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()  # type: ignore[attr-defined]
            assert f"{prefix_id}: the stored {layout} object has unreadable metadata" in info.value.details()  # type: ignore[attr-defined]
