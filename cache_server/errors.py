"""Errors of the cache server's plain classes.

The store, writer, reader and fetch session raise only these. Each class names the gRPC status it
becomes by its ``code``; :mod:`.service` turns codes into ``grpc.StatusCode``.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error the cache server reports to a caller; the message is for humans.

    ``code`` is the ``google.rpc.Code`` number it is reported with (INTERNAL for the base class).
    """

    code = 13


class InvalidArgument(CacheError, ValueError):
    """A request is malformed: a bad key, region, index, tag, or a stream out of order.

    Also a ``ValueError``, so value objects (keys) raise it on construction.
    """

    code = 3


class NotFound(CacheError):
    """No committed object has the requested key."""

    code = 5


class ResourceExhausted(CacheError):
    """The store's byte limit or the disk is full; nothing half-written stays visible."""

    code = 8


class DataLoss(CacheError):
    """Stored bytes do not match their checksum (or the file is shorter than its manifest)."""

    code = 15


class FailedPrecondition(CacheError):
    """The request conflicts with what is stored (e.g. a committed object with other regions)."""

    code = 9
