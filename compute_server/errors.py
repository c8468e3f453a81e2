"""The compute server's error vocabulary; the servicer maps each to a gRPC status in one place."""

from __future__ import annotations


class ComputeError(Exception):
    """A request failed for a reason the caller should see; ``code`` is a grpc.StatusCode name."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(ComputeError):
    code = "INVALID_ARGUMENT"


class NotFound(ComputeError):
    code = "NOT_FOUND"


class FailedPrecondition(ComputeError):
    code = "FAILED_PRECONDITION"


class Unavailable(ComputeError):
    code = "UNAVAILABLE"
