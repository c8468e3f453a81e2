"""TLS, mutual TLS, bearer tokens with scopes and per-client limits, on real servers.

Certificates come from a CA made in the test (trustme). The cluster: a cache server serving mutual
TLS and requiring tokens, a compute server serving TLS and requiring tokens, which reaches the
cache with a client certificate and a read,write token. The pure parts (token files, the limiter,
credentials) are unit-tested first.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from hypothesis import given, settings, strategies as st
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contiguouskv import launch
from contiguouskv.cache_server.service import METHOD_SCOPES as CACHE_SCOPES
from contiguouskv.client import (
    NO_RETRY, ClientTls, ContiguousKVClient, FailedPreconditionError, PermissionDeniedError, ResourceExhaustedError,
    UnauthenticatedError, UnavailableError,
)
from contiguouskv.common.access import ClientLimiter, peer_host
from contiguouskv.common.security import (
    SecurityConfigError, TokenTable, bearer_token, channel_credentials, parse_tokens,
)
from contiguouskv.compute_server.servicer import METHOD_SCOPES as COMPUTE_SCOPES
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc, compute_pb2, compute_pb2_grpc

READ_TOKEN = "r" * 8 + "-read-only-token"
WRITE_TOKEN = "w" * 8 + "-read-write-token"
CACHE_TOKEN = "c" * 8 + "-compute-to-cache"
ONLY_WRITE = "o" * 8 + "-write-only-token"


# --- pure parts ------------------------------------------------------------------------------------

def test_token_file_is_parsed_with_scopes_names_and_comments() -> None:
    entries = parse_tokens(f"# tokens\n{READ_TOKEN} read alice\n\n{WRITE_TOKEN} read,write  # ops\n", "f")
    grants = [grant for _, grant in entries]
    assert [g.name for g in grants] == ["alice", "token-4"]
    assert [sorted(g.scopes) for g in grants] == [["read"], ["read", "write"]]


@pytest.mark.parametrize("text, needle", [
    ("short read", "shorter than 16"),
    (f"{READ_TOKEN} admin", "scopes must be"),
    (f"{READ_TOKEN}", "expected"),
    (f"{READ_TOKEN} read a b", "expected"),
    ("# nothing\n", "no tokens"),
])
def test_bad_token_files_are_refused_with_the_line(text: str, needle: str) -> None:
    with pytest.raises(SecurityConfigError, match=needle):
        parse_tokens(text, "tokens.txt")


def test_token_table_reloads_a_changed_file_and_keeps_the_old_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{READ_TOKEN} read alice\n")
    table = TokenTable(path, recheck_s=0.0)
    assert table.lookup(READ_TOKEN).name == "alice"
    assert table.lookup(WRITE_TOKEN) is None
    assert table.lookup(READ_TOKEN[:-1]) is None  # a prefix of a token is not the token
    path.write_text(f"{WRITE_TOKEN} read,write bob\n")
    assert table.lookup(READ_TOKEN) is None
    assert table.lookup(WRITE_TOKEN).scopes == {"read", "write"}
    path.write_text("garbage\n")  # a broken edit: bob keeps working, nobody new gets in
    assert table.lookup(WRITE_TOKEN).name == "bob"
    assert table.lookup("garbage") is None


def test_bearer_token_is_read_from_the_authorization_header_only() -> None:
    assert bearer_token([("user-agent", "x"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-authorization", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_client_limiter_counts_per_client() -> None:
    limiter = ClientLimiter(2)
    assert limiter.try_enter("a") and limiter.try_enter("a")
    assert not limiter.try_enter("a")
    assert limiter.try_enter("b")
    limiter.leave("a")
    assert limiter.active("a") == 1 and limiter.try_enter("a")
    assert ClientLimiter(0).try_enter("a")  # 0 = unlimited
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "[::1]"


def test_a_token_is_not_sent_in_plaintext_off_this_machine() -> None:
    with pytest.raises(SecurityConfigError, match="only over TLS"):
        channel_credentials("10.1.2.3:50051", None, READ_TOKEN)
    assert channel_credentials("127.0.0.1:50051", None, READ_TOKEN) is not None
    assert channel_credentials("10.1.2.3:50051", None, None) is None


def test_every_rpc_of_both_services_has_a_scope() -> None:
    for module, scopes in ((cache_pb2, CACHE_SCOPES), (compute_pb2, COMPUTE_SCOPES)):
        for service in module.DESCRIPTOR.services_by_name.values():
            methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
            assert methods == set(scopes)
    assert CACHE_SCOPES["/contiguouskv.v1.CacheService/PutPrefix"] == "write"
    assert CACHE_SCOPES["/contiguouskv.v1.CacheService/Fetch"] == "read"
    assert CACHE_SCOPES["/contiguouskv.v1.CacheService/ReportAttention"] == "write"
    assert COMPUTE_SCOPES["/contiguouskv.v1.ComputeService/RegisterPrefix"] == "write"
    assert COMPUTE_SCOPES["/contiguouskv.v1.ComputeService/Reprefill"] == "read"


# --- real servers ----------------------------------------------------------------------------------

class Pki:
    """A CA, server certificates for loopback, a client certificate; written as PEM files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.cert_file, self.key_file = self.issue("server", "localhost", "127.0.0.1")
        self.client_cert, self.client_key = self.issue("client", "compute-client")

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def issue(self, name: str, *identities: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(*identities)
        return (self._write(f"{name}.pem", b"".join(c.bytes() for c in cert.cert_chain_pems)),
                self._write(f"{name}.key", cert.private_key_pem.bytes()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("secure")
    pki = Pki(tmp / "pki")
    cache_tokens = tmp / "cache-tokens"
    cache_tokens.write_text(f"{CACHE_TOKEN} read,write compute\n{READ_TOKEN} read reader\n")
    compute_tokens = tmp / "compute-tokens"
    compute_tokens.write_text(f"{READ_TOKEN} read reader\n{WRITE_TOKEN} read,write writer\n"
                              f"{ONLY_WRITE} write registrar\n")
    cache_token_file = tmp / "cache-token"
    cache_token_file.write_text(CACHE_TOKEN + "\n")
    cache_metrics, compute_metrics = _free_port(), _free_port()
    cache = launch.cache_server(tmp / "store", "--tls-cert-file", str(pki.cert_file), "--tls-key-file",
                                str(pki.key_file), "--tls-client-ca-file", str(pki.ca_file),
                                "--auth-tokens-file", str(cache_tokens), "--max-streams-per-client", "2",
                                "--metrics-port", str(cache_metrics))
    with cache:
        compute = launch.compute_server(
            "random:tiny", cache.address, "--threads", "1", "--dtype", "float32",
            "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
            "--auth-tokens-file", str(compute_tokens),
            "--cache-tls-ca-file", str(pki.ca_file), "--cache-tls-cert-file", str(pki.client_cert),
            "--cache-tls-key-file", str(pki.client_key), "--cache-token-file", str(cache_token_file),
            "--metrics-port", str(compute_metrics))
        with compute:
            yield {"pki": pki, "cache": cache.address, "compute": compute.address, "tmp": tmp,
                   "compute_tokens": compute_tokens, "metrics": (cache_metrics, compute_metrics)}


def _client(cluster: dict[str, object], token: str | None, **tls: object) -> ContiguousKVClient:
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    return ContiguousKVClient(str(cluster["compute"]), timeout=60, retry=NO_RETRY, token=token,
                              tls=ClientTls(str(pki.ca_file), **tls))  # type: ignore[arg-type]  # a str path, as users write


PREFIX_IDS = list(range(3, 200))


def test_scopes_decide_who_registers_and_who_reads(cluster: dict[str, object]) -> None:
    with _client(cluster, WRITE_TOKEN) as writer:
        prefix = writer.register(token_ids=PREFIX_IDS)
        expected = writer.reprefill(prefix.prefix_id, [5, 6, 7], policy="contiguous", budget=0.5)
    with _client(cluster, READ_TOKEN) as reader:
        got = reader.reprefill(prefix.prefix_id, [5, 6, 7], policy="contiguous", budget=0.5)
        assert got.token_id == expected.token_id
        assert reader.model_info().num_layers > 0
        with pytest.raises(PermissionDeniedError, match="'write' scope"):
            reader.register(token_ids=[9, 9, 9, 9])
    with _client(cluster, ONLY_WRITE) as registrar, pytest.raises(PermissionDeniedError, match="'read' scope"):
        registrar.reprefill(prefix.prefix_id, [5, 6, 7])


@pytest.mark.parametrize("token", [None, "x" * 40, READ_TOKEN + "x"])
def test_missing_or_unknown_tokens_are_unauthenticated(cluster: dict[str, object], token: str | None) -> None:
    with _client(cluster, token) as client, pytest.raises(UnauthenticatedError) as info:
        client.model_info()
    if token is not None:
        assert token not in str(info.value)  # never echoed


def test_refused_calls_show_in_both_servers_metrics(cluster: dict[str, object]) -> None:
    with _client(cluster, "z" * 20) as stranger, pytest.raises(UnauthenticatedError):
        stranger.model_info()
    asyncio.run(_cache_call(cluster, True, "z" * 20, "list"))
    cache_port, compute_port = cluster["metrics"]  # type: ignore[misc]
    cache_text = urllib.request.urlopen(f"http://127.0.0.1:{cache_port}/metrics", timeout=10).read().decode()
    compute_text = urllib.request.urlopen(f"http://127.0.0.1:{compute_port}/metrics", timeout=10).read().decode()
    refused = re.search(r'ckv_cache_refused_calls_total\{status="UNAUTHENTICATED"\} (\d+)', cache_text)
    assert refused and int(refused.group(1)) >= 1
    assert re.search(r'ckv_compute_requests_total\{[^}]*UNAUTHENTICATED[^}]*\} [1-9]', compute_text)


def test_plaintext_and_untrusted_clients_cannot_connect(cluster: dict[str, object], tmp_path: Path) -> None:
    with ContiguousKVClient(str(cluster["compute"]), timeout=10, retry=NO_RETRY, token=READ_TOKEN) as plain, \
            pytest.raises(UnavailableError) as closed:
        plain.model_info()
    assert "--tls-ca-file" in closed.value.details  # a TLS server hangs up on plaintext: say so
    stranger = Pki(tmp_path / "other")  # a CA the server's certificate does not chain to
    with ContiguousKVClient(str(cluster["compute"]), timeout=10, retry=NO_RETRY, token=READ_TOKEN,
                            tls=ClientTls(stranger.ca_file)) as untrusting, pytest.raises(UnavailableError) as info:
        untrusting.model_info()
    # the hint is about certificates, not about starting a server that is running
    assert "TLS handshake" in info.value.details and "start one" not in info.value.details
    with pytest.raises(SecurityConfigError, match="a path"):
        ClientTls(ca_file=7)  # type: ignore[arg-type]


def test_a_certificate_for_another_host_gets_the_tls_hint(cluster: dict[str, object]) -> None:
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    port = str(cluster["compute"]).rsplit(":", 1)[1]
    # the server's certificate names localhost and 127.0.0.1: a name it does not hold fails verification
    tls = ClientTls(ca_file=str(pki.ca_file), server_name="cache.example.org")
    with ContiguousKVClient(f"localhost:{port}", timeout=10, retry=NO_RETRY, token=READ_TOKEN, tls=tls) as client, \
            pytest.raises(UnavailableError) as info:
        client.model_info()
    assert "TLS handshake" in info.value.details and "start one" not in info.value.details


async def _cache_call(cluster: dict[str, object], cert: bool, token: str | None,
                      call: str) -> grpc.StatusCode | str:
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    creds = grpc.ssl_channel_credentials(
        pki.ca_file.read_bytes(), pki.client_key.read_bytes() if cert else None,
        pki.client_cert.read_bytes() if cert else None)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.secure_channel(str(cluster["cache"]), creds) as channel:
        try:
            if call == "health":
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            if call == "list":
                await stub.ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=10, metadata=metadata)
            else:
                await stub.DeletePrefix(cache_pb2.DeletePrefixRequest(prefix_id="nothing-here"), timeout=10,
                                        metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            return err.code()


@pytest.mark.parametrize("cert, token, call, expected", [
    (False, CACHE_TOKEN, "list", grpc.StatusCode.UNAVAILABLE),  # mutual TLS: no client certificate
    (True, None, "list", grpc.StatusCode.UNAUTHENTICATED),
    (True, READ_TOKEN, "list", grpc.StatusCode.OK),
    (True, READ_TOKEN, "delete", grpc.StatusCode.PERMISSION_DENIED),
    (True, CACHE_TOKEN, "delete", grpc.StatusCode.OK),  # allowed (deleting nothing is a no-op)
    (True, None, "health", "SERVING"),  # probes need no token
])
async def test_cache_server_requires_a_client_certificate_and_scoped_tokens(
        cluster: dict[str, object], cert: bool, token: str | None, call: str, expected: object) -> None:
    assert await _cache_call(cluster, cert, token, call) == expected


async def test_streams_per_client_are_limited_with_a_clear_status(cluster: dict[str, object]) -> None:
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes(), pki.client_key.read_bytes(),
                                         pki.client_cert.read_bytes())
    metadata = (("authorization", f"Bearer {READ_TOKEN}"),)
    async with grpc.aio.secure_channel(str(cluster["cache"]), creds) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        held = [stub.Fetch(metadata=metadata) for _ in range(2)]
        for call in held:  # wait until both streams are counted by the server
            await call.wait_for_connection()
        await asyncio.sleep(0.3)
        third = stub.Fetch(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await third.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "max_streams_per_client (2)" in details and "client reader@127.0.0.1" in details
        held[0].cancel()
        await asyncio.sleep(0.3)
        fourth = stub.Fetch(metadata=metadata)
        await fourth.done_writing()
        assert await fourth.read() == grpc.aio.EOF  # admitted again once one stream ended
        held[1].cancel()


def test_tokens_rotate_without_a_restart(cluster: dict[str, object]) -> None:
    path = cluster["compute_tokens"]
    assert isinstance(path, Path)
    original = path.read_text()
    rotated = "n" * 8 + "-rotated-in-token"
    try:
        path.write_text(f"{rotated} read reader2\n{WRITE_TOKEN} read,write writer\n")
        time.sleep(2.5)  # the table re-stats the file at most every 2 s
        with _client(cluster, rotated) as fresh:
            assert fresh.model_info().num_layers > 0
        with _client(cluster, READ_TOKEN) as old, pytest.raises(UnauthenticatedError):
            old.model_info()
    finally:
        path.write_text(original)
        time.sleep(2.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_certificate_rotates_without_a_restart_and_probes_use_the_health_port(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ_TOKEN} read\n")
    health_port = _free_port()
    with launch.cache_server(tmp_path / "store", "--tls-cert-file", str(pki.cert_file), "--tls-key-file",
                             str(pki.key_file), "--auth-tokens-file", str(tokens),
                             "--health-port", str(health_port)) as server:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain:  # what a kubelet probe does
            reply = health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service="contiguouskv.v1.CacheService"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:  # and nothing but health
                cache_pb2_grpc.CacheServiceStub(plain).ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        rotated = Pki(tmp_path / "next")  # a new CA: only clients trusting it accept the new certificate
        pki.cert_file.write_bytes(rotated.cert_file.read_bytes())
        pki.key_file.write_bytes(rotated.key_file.read_bytes())

        def list_with(ca: Path) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(ca.read_bytes())
            with grpc.secure_channel(server.address, creds) as channel:
                try:
                    cache_pb2_grpc.CacheServiceStub(channel).ListPrefixes(
                        cache_pb2.ListPrefixesRequest(), timeout=10,
                        metadata=(("authorization", f"Bearer {READ_TOKEN}"),))
                    return grpc.StatusCode.OK
                except grpc.RpcError as err:
                    return err.code()

        assert list_with(rotated.ca_file) == grpc.StatusCode.OK
        assert list_with(pki.ca_file) == grpc.StatusCode.UNAVAILABLE


def test_config_refuses_unpaired_or_missing_tls_files(tmp_path: Path) -> None:
    from contiguouskv.cache_server.config import CacheServerConfig
    from contiguouskv.compute_server.config import ComputeServerConfig

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="give both or neither"):
        CacheServerConfig(root=tmp_path, tls_cert_file=cert)
    with pytest.raises(ValueError, match="auth_tokens_file: .* is not a readable file"):
        CacheServerConfig(root=tmp_path, auth_tokens_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="cache_tls_ca_file too"):
        ComputeServerConfig(model="random:tiny", cache=("127.0.0.1:1",), cache_tls_cert_file=cert,
                            cache_tls_key_file=cert)
    with pytest.raises(ValueError, match="max_streams_per_client"):
        ComputeServerConfig(model="random:tiny", cache=("127.0.0.1:1",), max_streams_per_client=-1)


@settings(max_examples=60, deadline=None)
@given(header=st.sampled_from(["authorization", "Authorization", "x-token"]),
       value=st.one_of(st.just("Bearer "), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                                       max_size=300).map(lambda t: "Bearer " + t),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)))
def test_any_other_credential_is_unauthenticated(cluster: dict[str, object], header: str, value: str) -> None:
    """Fuzzed authorization headers: never let in, never an unhandled error, the server keeps serving."""
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    creds = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
    with grpc.secure_channel(str(cluster["compute"]), creds) as channel:
        stub = compute_pb2_grpc.ComputeServiceStub(channel)
        try:
            stub.GetModelInfo(compute_pb2.GetModelInfoRequest(), timeout=10, metadata=((header.lower(), value),))
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
    assert code == grpc.StatusCode.UNAUTHENTICATED, (header, value)


def test_cli_reaches_a_secured_server_with_a_token_file_or_env(cluster: dict[str, object], tmp_path: Path) -> None:
    pki = cluster["pki"]
    assert isinstance(pki, Pki)
    token_file = tmp_path / "token"
    token_file.write_text(READ_TOKEN + "\n")
    base = [sys.executable, "-m", "contiguouskv.cli", "info", "--server", str(cluster["compute"]), "--json",
            "--tls-ca-file", str(pki.ca_file)]
    env = {k: v for k, v in os.environ.items() if k != "CKV_TOKEN"}
    with_file = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, env=env,
                               timeout=120)
    assert with_file.returncode == 0, with_file.stderr
    assert json.loads(with_file.stdout)["num_layers"] > 0
    with_env = subprocess.run(base, capture_output=True, text=True, env={**env, "CKV_TOKEN": READ_TOKEN}, timeout=120)
    assert with_env.returncode == 0, with_env.stderr
    without = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert without.returncode == 1
    assert "UNAUTHENTICATED" in without.stderr and "--token-file" in without.stderr  # the hint


def test_a_compute_server_the_cache_refuses_says_so_and_not_that_the_caller_is_unauthenticated(
        cluster: dict[str, object]) -> None:
    """Without --cache-token-file (its own credential for the cache) the compute server's calls to the
    cache are refused: the caller gets FAILED_PRECONDITION naming the compute server's settings, not
    UNAUTHENTICATED, which would send them looking for their own token."""
    pki, tmp = cluster["pki"], cluster["tmp"]
    assert isinstance(pki, Pki) and isinstance(tmp, Path)
    with launch.compute_server(
            "random:tiny", str(cluster["cache"]), "--threads", "1", "--dtype", "float32",
            "--cache-tls-ca-file", str(pki.ca_file), "--cache-tls-cert-file", str(pki.client_cert),
            "--cache-tls-key-file", str(pki.client_key)) as tokenless:
        with ContiguousKVClient(tokenless.address, timeout=60, retry=NO_RETRY) as client:
            with pytest.raises(FailedPreconditionError,
                               match="refused this compute server's credentials .*cache_token_file"):
                client.register(token_ids=PREFIX_IDS)
