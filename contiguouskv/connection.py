"""How the CLI's client commands reach compute servers: address, timeout, TLS and bearer token."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contiguouskv.client import ContiguousKVClient


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for compute servers that serve TLS or require tokens (docs/security.md)."""
    a = parser.add_argument
    a("--token-file", type=Path, help="bearer token to send (default: env CKV_TOKEN, if set)")
    a("--tls-ca-file", type=Path, help="connect over TLS, trusting this CA bundle")
    a("--tls-cert-file", type=Path, help="mutual TLS: client certificate (PEM; with --tls-key-file)")
    a("--tls-key-file", type=Path, help="key of --tls-cert-file (PEM)")
    a("--tls-server-name", help="name the server's certificate carries, if not the address's host")


def client_from_args(args: argparse.Namespace) -> "ContiguousKVClient":
    """The SDK client for ``--server``, ``--timeout`` and the connection flags (token: env ``CKV_TOKEN``)."""
    from contiguouskv.client import ClientTls, ContiguousKVClient
    from contiguouskv.common.security import token_from

    tls = None
    if args.tls_ca_file or args.tls_cert_file:
        tls = ClientTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)
    return ContiguousKVClient(args.server, timeout=args.timeout, token=token_from(args.token_file, os.environ),
                              tls=tls)
