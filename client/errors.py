"""The SDK's exceptions. No grpc type ever reaches the caller."""

from __future__ import annotations


class ContiguousKVError(Exception):
    """Base of every SDK error; ``status`` is the gRPC status name, ``details`` the server's message."""

    status = "UNKNOWN"

    def __init__(self, details: str, status: str | None = None) -> None:
        super().__init__(f"{status or self.status}: {details}")
        self.details = details
        if status is not None:
            self.status = status


class InvalidArgumentError(ContiguousKVError):
    status = "INVALID_ARGUMENT"


class NotFoundError(ContiguousKVError):
    status = "NOT_FOUND"


class FailedPreconditionError(ContiguousKVError):
    status = "FAILED_PRECONDITION"


class UnavailableError(ContiguousKVError):
    status = "UNAVAILABLE"


class DeadlineExceededError(ContiguousKVError):
    status = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(ContiguousKVError):
    status = "RESOURCE_EXHAUSTED"


class DataLossError(ContiguousKVError):
    status = "DATA_LOSS"


class InternalError(ContiguousKVError):
    status = "INTERNAL"


ERRORS_BY_STATUS: dict[str, type[ContiguousKVError]] = {
    cls.status: cls
    for cls in (InvalidArgumentError, NotFoundError, FailedPreconditionError, UnavailableError,
                DeadlineExceededError, ResourceExhaustedError, DataLossError, InternalError)
}
