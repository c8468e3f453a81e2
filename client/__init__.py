"""ContiguousKV client SDK: register prefixes, run Re-Prefill, stream tokens.

>>> from contiguouskv.client import ContiguousKVClient          # doctest: +SKIP
>>> with ContiguousKVClient("127.0.0.1:50051") as ckv:          # doctest: +SKIP
...     prefix = ckv.register("A long document ...")
...     print(ckv.reprefill(prefix.prefix_id, "Question?", max_new_tokens=16).answer)
"""

from contiguouskv.client.aio import AsyncContiguousKVClient
from contiguouskv.client.errors import (
    ContiguousKVError, DataLossError, DeadlineExceededError, FailedPreconditionError, InternalError,
    InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError,
)
from contiguouskv.client.sync import ContiguousKVClient
from contiguouskv.client.types import (
    GeneratedToken, LayerTiming, ModelInfo, PeriodSelection, RegisteredPrefix, ReprefillResult, Timings,
)

__all__ = [
    "AsyncContiguousKVClient", "ContiguousKVClient", "ContiguousKVError", "DataLossError",
    "DeadlineExceededError", "FailedPreconditionError", "GeneratedToken", "InternalError",
    "InvalidArgumentError", "LayerTiming", "ModelInfo", "NotFoundError", "PeriodSelection", "RegisteredPrefix",
    "ReprefillResult", "ResourceExhaustedError", "Timings", "UnavailableError",
]
