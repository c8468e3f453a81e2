"""Transport security and bearer tokens, shared by both servers, the compute server's cache client and the SDK.

- **Tokens** (:class:`TokenTable`): a file of ``<token> <scope>[,<scope>] [<name>]`` lines, scopes
  ``read`` and ``write``. The server keeps only SHA-256 digests and compares a presented token
  against every entry with :func:`hmac.compare_digest` (no early exit, so the time does not say how
  much of a token matched or which entry). The file is re-read when it changes: rotating a token
  is editing the file (or updating the mounted Secret), no restart.
- **Server TLS** (:func:`server_credentials`): certificate and key files, and optionally a client
  CA bundle, which turns on mutual TLS (clients must present a certificate it signed). The files
  are re-read when they change, on the next handshake: rotating a certificate needs no restart.
- **Client side** (:class:`ClientTls`, :func:`channel_credentials`): a CA bundle to trust (the
  system roots when absent), optionally a client certificate and key for mutual TLS, and a token
  sent as ``authorization: Bearer ...`` on every call. gRPC sends tokens only over TLS or to a
  loopback address; a token for a remote address without TLS is refused here with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

READ, WRITE = "read", "write"
SCOPES = (READ, WRITE)
MIN_TOKEN_CHARS = 16
AUTH_HEADER = "authorization"
_BEARER = "bearer "
_LOOPBACK_HOSTS = ("localhost", "127.", "[::1]", "::1", "unix:")


class SecurityConfigError(ValueError):
    """A token file, certificate or key is missing or malformed; the message names the file."""


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """Who a valid token belongs to (``name``, for logs and per-client limits) and what it may do."""

    name: str
    scopes: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str) -> list[tuple[bytes, Grant]]:
    """Parse a token file: ``<token> <scope>[,<scope>] [<name>]`` per line, ``#`` comments.

    Tokens are at least 16 characters; scopes are ``read`` and ``write``; names default to
    ``token-<line>``. Raises :class:`SecurityConfigError` naming ``source`` and the line.
    """
    entries: list[tuple[bytes, Grant]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise SecurityConfigError(f"{source} line {number}: expected '<token> <scopes> [<name>]'")
        token, scopes = fields[0], frozenset(fields[1].split(","))
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(f"{source} line {number}: token shorter than {MIN_TOKEN_CHARS} characters")
        if not scopes <= set(SCOPES) or not scopes:
            raise SecurityConfigError(f"{source} line {number}: scopes must be read, write or read,write")
        name = fields[2] if len(fields) == 3 else f"token-{number}"
        entries.append((_digest(token), Grant(name, scopes)))
    if not entries:
        raise SecurityConfigError(f"{source}: no tokens (every caller would be refused)")
    return entries


def check_server_files(cert: Path | None, key: Path | None, client_ca: Path | None,
                       tokens: Path | None) -> None:
    """Raise ``ValueError`` naming the config field when TLS or token files are missing or unpaired."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert_file and tls_key_file: give both or neither")
    if client_ca is not None and cert is None:
        raise ValueError("tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file too")
    for field, path in (("tls_cert_file", cert), ("tls_key_file", key), ("tls_client_ca_file", client_ca),
                        ("auth_tokens_file", tokens)):
        if path is not None and not path.is_file():
            raise ValueError(f"{field}: {path} is not a readable file")


def _file_stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class TokenTable:
    """The bearer tokens a server accepts, re-read from ``path`` when the file changes.

    :meth:`lookup` is safe to call from the event loop: it stats the file at most every
    ``recheck_s`` seconds and re-reads it only when its inode, size or mtime changed (a Kubernetes
    Secret update swaps a symlink, which changes the inode). A file that became unreadable or
    malformed is logged and the previous tokens stay in force, so a bad edit locks nobody out.
    """

    def __init__(self, path: Path, recheck_s: float = 2.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._stamp = _file_stamp(path)
        self._entries = parse_tokens(path.read_text(), str(path))
        self._checked = time.monotonic()
        log.info("auth: %d bearer token(s) from %s", len(self._entries), path)

    def lookup(self, token: str) -> Grant | None:
        """The grant of ``token``, or ``None``; the time taken does not depend on which entry matched."""
        self._maybe_reload()
        presented = _digest(token)
        found: Grant | None = None
        for digest, grant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = grant
        return found

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = _file_stamp(self.path)
                if stamp == self._stamp:
                    return
                entries = parse_tokens(self.path.read_text(), str(self.path))
            except (OSError, SecurityConfigError) as exc:
                log.error("auth: keeping the previous tokens, cannot reload %s: %s", self.path, exc)
                return
            self._stamp, self._entries = stamp, entries
            log.info("auth: reloaded %d bearer token(s) from %s", len(entries), self.path)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header in call metadata, or ``None``."""
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER):].strip()
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise SecurityConfigError(f"{what} {path}: empty")
    return data


class _CertificateFiles:
    """Server certificate, key and client CA; hands gRPC a new configuration when a file changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = [p for p in (cert, key, client_ca) if p is not None]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamps = self._current_stamps()
        self.initial = self._load()

    def _current_stamps(self) -> list[tuple[int, int, int]]:
        return [_file_stamp(p) for p in self.paths]

    def _load(self) -> grpc.ServerCertificateConfiguration:
        pair = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        ca = _read(self.client_ca, "client CA") if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration if a file changed, else None."""
        try:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            config = self._load()
        except (OSError, SecurityConfigError) as exc:
            log.error("tls: keeping the previous certificate, cannot reload: %s", exc)
            return None
        self._stamps = stamps
        log.info("tls: reloaded the server certificate from %s", self.cert)
        return config


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials for a server port (``None``: plaintext); ``client_ca`` turns on mutual TLS."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if cert is None or key is None:
        raise SecurityConfigError("tls_cert_file and tls_key_file go together")
    files = _CertificateFiles(cert, key, client_ca)
    # gRPC calls ``fetch`` before each handshake; ``None`` means "unchanged" (the stubs say otherwise).
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,  # type: ignore[arg-type]
                                               require_client_authentication=client_ca is not None)


@dataclasses.dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client reaches a TLS server: CA bundle to trust (system roots when ``None``), an
    optional client certificate and key (mutual TLS), and ``server_name`` to expect in the
    server's certificate when it differs from the address's host. Paths may be given as strings."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                if not isinstance(value, (str, os.PathLike)):
                    raise SecurityConfigError(f"{name}: a path, got {type(value).__name__}")
                object.__setattr__(self, name, Path(value))
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityConfigError("a client certificate and its key go together")


def is_loopback(address: str) -> bool:
    """Whether a ``HOST:PORT`` address names this machine (where gRPC lets a token go without TLS)."""
    return address.startswith(_LOOPBACK_HOSTS)


def channel_credentials(address: str, tls: ClientTls | None,
                        token: str | None) -> grpc.ChannelCredentials | None:
    """Credentials for a channel to ``address``; ``None`` means a plaintext channel without token."""
    call = grpc.access_token_call_credentials(token) if token else None
    if tls is not None:
        channel = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca_file, "CA bundle") if tls.ca_file else None,
            private_key=_read(tls.key_file, "client key") if tls.key_file else None,
            certificate_chain=_read(tls.cert_file, "client certificate") if tls.cert_file else None)
        return grpc.composite_channel_credentials(channel, call) if call else channel
    if call is None:
        return None
    if not is_loopback(address):
        raise SecurityConfigError(f"a bearer token is sent only over TLS (or to a loopback address); "
                                  f"give a CA bundle to reach {address}")
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.composite_channel_credentials(local, call)


def _tls_options(tls: ClientTls | None) -> list[tuple[str, str]]:
    if tls is not None and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def open_channel(address: str, tls: ClientTls | None, token: str | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to ``address``: TLS and/or token as :func:`channel_credentials` decides."""
    options = [*options, *_tls_options(tls)]
    credentials = channel_credentials(address, tls, token)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def open_aio_channel(address: str, tls: ClientTls | None, token: str | None,
                     options: Sequence[tuple[str, Any]] = (),
                     interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``, like :func:`open_channel`."""
    options = [*options, *_tls_options(tls)]
    credentials = channel_credentials(address, tls, token)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def read_token_file(path: Path) -> str:
    """The single token in ``path`` (surrounding whitespace stripped)."""
    token = _read(path, "token file").decode("utf-8").strip()
    if len(token.split()) != 1:
        raise SecurityConfigError(f"token file {path}: expected one token")
    return token


def token_from(token_file: Path | None, env: Mapping[str, str], variable: str = "CKV_TOKEN") -> str | None:
    """A client token from ``token_file`` if given, else the ``variable`` entry of ``env``."""
    if token_file is not None:
        return read_token_file(token_file)
    value = env.get(variable, "").strip()
    return value or None
