"""The compute server's error vocabulary; the servicer maps each to a gRPC status in one place."""

from __future__ import annotations


class ComputeError(Exception):
    """A request failed for a reason the caller should see; ``code`` is a grpc.StatusCode name."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadRequest(ComputeError):
    """The request itself is malformed or over a limit."""

    code = "INVALID_ARGUMENT"


class NotRegistered(ComputeError):
    """The prefix is not stored on any cache shard."""

    code = "NOT_FOUND"


class NotServable(ComputeError):
    """The prefix is stored, but not so that this request can be served (other model, missing layout)."""

    code = "FAILED_PRECONDITION"


class Unavailable(ComputeError):
    """No cache shard could be reached."""

    code = "UNAVAILABLE"
