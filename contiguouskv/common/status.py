"""Status messages both servers send: cut to a size every client accepts."""

from __future__ import annotations

MAX_DETAILS_BYTES = 2000


def status_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` cut to ``limit`` UTF-8 bytes: a status message travels percent-encoded in a
    trailer, and a client drops trailers over its metadata limit (8 KiB by default) and with them
    the status (it sees RESOURCE_EXHAUSTED "received metadata size exceeds hard limit")."""
    raw = message.encode()
    return message if len(raw) <= limit else raw[:limit].decode(errors="ignore") + "..."
