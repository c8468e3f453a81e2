"""ContiguousKV client SDK: register prefixes, run Re-Prefill, stream tokens.

Sync (:class:`ContiguousKVClient`) and asyncio (:class:`AsyncContiguousKVClient`) clients of one or
several compute servers (round robin), a timeout on every call, retries of idempotent calls on
UNAVAILABLE (:class:`RetryPolicy`), frozen-dataclass results and :class:`ContiguousKVError`
subclasses for errors. When OpenTelemetry is installed, each call is a span and its trace context
travels to the servers.

>>> from contiguouskv.client import ContiguousKVClient          # doctest: +SKIP
>>> with ContiguousKVClient("127.0.0.1:50051") as ckv:          # doctest: +SKIP
...     prefix = ckv.register("A long document ...")
...     print(ckv.reprefill(prefix.prefix_id, "Question?", max_new_tokens=16).answer)
"""

from contiguouskv.client.aio import AsyncContiguousKVClient
from contiguouskv.client.errors import (
    AbortedError, AlreadyExistsError, ContiguousKVError, DataLossError, DeadlineExceededError,
    FailedPreconditionError, InternalError, InvalidArgumentError, NotFoundError, OutOfRangeError,
    PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError, UnavailableError, UnimplementedError,
)
from contiguouskv.client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from contiguouskv.client.sync import ContiguousKVClient
from contiguouskv.client.types import (
    GeneratedToken, LayerTiming, ModelInfo, PeriodSelection, PolicyInfo, RegisteredPrefix, ReprefillResult, Timings,
    TokenLayerSelection,
)
from contiguouskv.common.security import ClientTls

__all__ = [
    "DEFAULT_RETRY", "NO_RETRY", "AbortedError", "AlreadyExistsError", "AsyncContiguousKVClient", "ClientTls",
    "ContiguousKVClient", "ContiguousKVError", "DataLossError", "DeadlineExceededError", "FailedPreconditionError",
    "GeneratedToken", "InternalError", "InvalidArgumentError", "LayerTiming", "ModelInfo", "NotFoundError",
    "OutOfRangeError", "PeriodSelection", "PermissionDeniedError", "PolicyInfo", "RegisteredPrefix", "ReprefillResult",
    "ResourceExhaustedError", "RetryPolicy", "Timings", "TokenLayerSelection", "UnauthenticatedError",
    "UnavailableError", "UnimplementedError",
]
