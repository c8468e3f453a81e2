"""How the CLI's client commands reach servers that serve TLS or require tokens (docs/security.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from contiguouskv.client import ContiguousKVClient
from contiguouskv.common.security import ClientTls, token_from


def add_connection_arguments(parser: argparse.ArgumentParser, peers: str = "the server",
                             scopes: str = "") -> None:
    """``--token-file`` and ``--tls-*`` flags for a command that calls ``peers``."""
    a = parser.add_argument
    a("--token-file", type=Path, help=f"bearer token{' with ' + scopes + ' scopes' if scopes else ''} to send "
      f"(default: env CKV_TOKEN, if set)")
    a("--tls-ca-file", type=Path, help=f"reach {peers} over TLS, trusting this CA bundle")
    a("--tls-cert-file", type=Path, help="mutual TLS: client certificate (PEM; with --tls-key-file)")
    a("--tls-key-file", type=Path, help="key of --tls-cert-file (PEM)")
    a("--tls-server-name", help=f"name the certificates of {peers} carry, if not the address's host")


def tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings the flags ask for (``None``: plaintext)."""
    if not (args.tls_ca_file or args.tls_cert_file):
        return None
    return ClientTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)


def token_from_args(args: argparse.Namespace) -> str | None:
    """``--token-file``'s token, else env ``CKV_TOKEN``, else ``None``."""
    return token_from(args.token_file, os.environ)


def client_from_args(args: argparse.Namespace) -> ContiguousKVClient:
    """The SDK client for ``--server``, ``--timeout`` and the connection flags."""
    return ContiguousKVClient(args.server, timeout=args.timeout, token=token_from_args(args),
                              tls=tls_from_args(args))
