"""The SDK's exceptions. No grpc type ever reaches the caller.

Every error of a call is a :class:`ContiguousKVError`; the subclass says which gRPC status the
server (or the channel) gave, ``status`` names it and ``details`` is the message. ``retryable``
marks the errors that an idempotent call may safely repeat (only UNAVAILABLE: the request never
ran, or ran on a server that went away); the clients retry those themselves (see
:class:`~contiguouskv.client.retry.RetryPolicy`), so callers see one only when retries ran out.
"""

from __future__ import annotations


class ContiguousKVError(Exception):
    """Base of every SDK error; ``status`` is the gRPC status name, ``details`` the server's message."""

    status = "UNKNOWN"
    retryable = False

    def __init__(self, details: str, status: str | None = None) -> None:
        super().__init__(f"{status or self.status}: {details}")
        self.details = details
        if status is not None:
            self.status = status


class InvalidArgumentError(ContiguousKVError, ValueError):
    """The request is malformed or out of range (the message names the field); also a ValueError."""

    status = "INVALID_ARGUMENT"


class NotFoundError(ContiguousKVError):
    """The prefix is not registered (on the cache shard that owns it)."""

    status = "NOT_FOUND"


class AlreadyExistsError(ContiguousKVError):
    status = "ALREADY_EXISTS"


class FailedPreconditionError(ContiguousKVError):
    """The request is valid but the stored state does not allow it (another model, a missing layout)."""

    status = "FAILED_PRECONDITION"


class UnavailableError(ContiguousKVError):
    """A server could not be reached, or went away; safe to retry for idempotent calls."""

    status = "UNAVAILABLE"
    retryable = True


class DeadlineExceededError(ContiguousKVError):
    """The call's timeout passed before an answer (raise ``timeout=``)."""

    status = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(ContiguousKVError):
    """A server limit was hit (message size, store capacity, in-flight bytes)."""

    status = "RESOURCE_EXHAUSTED"


class DataLossError(ContiguousKVError):
    """Stored records failed their checksum; register the prefix again."""

    status = "DATA_LOSS"


class AbortedError(ContiguousKVError):
    status = "ABORTED"


class OutOfRangeError(ContiguousKVError):
    status = "OUT_OF_RANGE"


class UnimplementedError(ContiguousKVError):
    """The server does not offer this call (an older server, or not a compute server)."""

    status = "UNIMPLEMENTED"


class PermissionDeniedError(ContiguousKVError):
    status = "PERMISSION_DENIED"


class UnauthenticatedError(ContiguousKVError):
    status = "UNAUTHENTICATED"


class InternalError(ContiguousKVError):
    """A server bug or an unexpected failure; the server's log has the details."""

    status = "INTERNAL"


ERRORS_BY_STATUS: dict[str, type[ContiguousKVError]] = {
    cls.status: cls
    for cls in (InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
                UnavailableError, DeadlineExceededError, ResourceExhaustedError, DataLossError, AbortedError,
                OutOfRangeError, UnimplementedError, PermissionDeniedError, UnauthenticatedError, InternalError)
}
