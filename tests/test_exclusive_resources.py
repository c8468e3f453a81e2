"""A server owns what it serves: its port, its store root, its shared-memory socket. A second server
asking for one a live server holds refuses to start and says which; nothing of the first changes.
Real servers, real files, real sockets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from contiguouskv import launch
from contiguouskv.cache_server.rootlock import RootInUse, hold_root
from contiguouskv.v1 import cache_pb2, cache_pb2_grpc
from test_cache_server import put_requests, records_of


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[launch.ServiceProcess, Path, str]]:
    """A cache server holding a root, a port and a shared-memory socket, with one object stored."""
    work = tmp_path_factory.mktemp("first")
    sock = str(work / "run" / "plane.sock")
    with launch.cache_server(work / "store", "--shm-socket", sock) as server:
        yield server, work / "store", sock


def _second(*args: str) -> subprocess.CompletedProcess[str]:
    """A second cache server started as a user would; it must give up within the timeout."""
    return subprocess.run([sys.executable, "-m", "contiguouskv.cache_server", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def _stored(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        return sorted(m.prefix_id for m in stub.ListPrefixes(cache_pb2.ListPrefixesRequest(), timeout=10).manifests)


def test_a_root_a_port_and_a_socket_in_use_are_refused(first: tuple[launch.ServiceProcess, Path, str],
                                                       tmp_path: Path) -> None:
    server, root, sock = first
    port = server.address.rsplit(":", 1)[1]
    with grpc.insecure_channel(server.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        stub.PutPrefix(iter(put_requests("p1", "l", records_of([("kv/G0", 3, 4096)]))), timeout=30)
    before = _stored(server.address)
    assert before == ["p1"]

    same_root = _second("--root", str(root), "--port", "0")
    assert same_root.returncode == 2
    assert f"root {root} is in use by another cache server (pid {server.proc.pid})" in same_root.stderr
    assert "Traceback" not in same_root.stderr

    same_port = _second("--root", str(tmp_path / "other"), "--port", port)
    assert same_port.returncode == 2 and f"cannot bind 127.0.0.1:{port}" in same_port.stderr

    same_socket = _second("--root", str(tmp_path / "third"), "--port", "0", "--shm-socket", sock)
    assert same_socket.returncode == 2 and f"{sock} is in use by a running cache server" in same_socket.stderr
    assert Path(sock).is_socket()  # not taken over, not removed

    # the first server still serves the same store, alone on its port: every call reaches it
    for _ in range(6):
        assert _stored(server.address) == before
    assert server.proc.poll() is None


def test_the_root_lock_goes_with_its_holder(tmp_path: Path) -> None:
    with hold_root(tmp_path / "root"):
        with pytest.raises(RootInUse, match="in use by another cache server"):
            with hold_root(tmp_path / "root"):
                pass
    with hold_root(tmp_path / "root"):  # released on exit
        pass
    # a killed holder leaves the lock file but not the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from contiguouskv.cache_server.rootlock import hold_root\n"
                               f"with hold_root(Path({str(tmp_path / 'killed')!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(RootInUse, match=f"pid {holder.pid}"):
        with hold_root(tmp_path / "killed"):
            pass
    holder.kill()
    holder.wait()
    with hold_root(tmp_path / "killed"):
        pass


def test_missing_required_settings_are_named() -> None:
    cache = _second("--port", "0")
    assert cache.returncode == 2 and "root is required: give --root, CKV_ROOT" in cache.stderr
    compute = subprocess.run([sys.executable, "-m", "contiguouskv.compute_server", "--model", "random:tiny"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert compute.returncode == 2 and "cache is required: give --cache, CKV_CACHE" in compute.stderr
