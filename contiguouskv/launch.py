"""Start the services as child processes on loopback (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


class ServiceProcess:
    """One server process started with ``--port 0 --port-file``; ``address`` once it is serving."""

    def __init__(self, module: str, args: list[str], *, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ckv-launch-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", "0",
                "--port-file", str(self.port_file)]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.address = ""

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Block until the port file appears; raise with the server's log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                self.address = f"127.0.0.1:{int(self.port_file.read_text())}"
                return self.address
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait (then SIGKILL); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._tmp.cleanup()
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        self.wait_ready()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def cache_server(root: Path, *extra: str, log_path: Path | None = None) -> ServiceProcess:
    return ServiceProcess("contiguouskv.cache_server", ["--root", str(root), *extra], log_path=log_path)


def compute_server(model: str, cache_address: str, *extra: str, log_path: Path | None = None,
                   env: dict[str, str] | None = None) -> ServiceProcess:
    """A compute server; ``env`` adds to this process's environment (e.g. PYTHONPATH for a policy plug-in)."""
    return ServiceProcess("contiguouskv.compute_server", ["--model", model, "--cache", cache_address, *extra],
                          log_path=log_path, env=env)
