"""When the SDK repeats a call: UNAVAILABLE only, idempotent calls only, within the call's timeout.

Which calls are idempotent (the clients pass ``idempotent=True`` for these):

- ``register``: the prefix id is a content hash of (model, tokens) and the cache commits an object
  atomically, so a repeated registration finds it stored (``already_registered``) or stores it once.
- ``reprefill`` and ``model_info``: read-only. (A Re-Prefill also sends attention statistics to the
  cache's DRAM policy; a repeat only adds one more observation.)
- ``generate``: read-only too, but a stream: it is retried only before its first token reached the
  caller; a stream that breaks later raises, since a repeat would deliver tokens twice.

The timeout given to a call bounds all its attempts and backoff sleeps together (:class:`Deadline`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from contiguouskv.client.errors import ContiguousKVError, DeadlineExceededError, InvalidArgumentError


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_attempts`` tries; before retry ``n`` (1, 2, ...) sleep a uniformly random time in
    ``[0, min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))]`` ("full jitter")."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("initial_backoff_s/max_backoff_s: need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier}")

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``retry`` (1 = the second attempt)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return (rng or random).uniform(0.0, ceiling)

    def delay_before_retry(self, error: ContiguousKVError, attempts: int, deadline: "Deadline") -> float | None:
        """Seconds to wait before trying again after ``attempts`` failed tries, or None to give up."""
        if not error.retryable or attempts >= self.max_attempts:
            return None
        delay = self.backoff_s(attempts)
        return delay if deadline.remaining() > delay else None


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


def check_retry(retry: object) -> RetryPolicy:
    """``retry`` if it is a :class:`RetryPolicy` (``NO_RETRY`` turns retries off), else an error."""
    if not isinstance(retry, RetryPolicy):
        raise InvalidArgumentError(f"retry: give a RetryPolicy (NO_RETRY for none), got {retry!r}", "INVALID_ARGUMENT")
    return retry


class Deadline:
    """The end of one SDK call: ``timeout_s`` from now, shared by its attempts."""

    def __init__(self, timeout_s: float) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise InvalidArgumentError(f"timeout: must be a number of seconds, got {timeout_s!r}", "INVALID_ARGUMENT")
        if not timeout_s > 0:
            raise InvalidArgumentError(f"timeout: must be > 0 seconds, got {timeout_s}", "INVALID_ARGUMENT")
        self.timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def attempt_timeout(self, address: str) -> float:
        """Seconds left for the next attempt; ``DeadlineExceededError`` when none are."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceededError(f"no answer from {address} within the call's timeout of "
                                        f"{self.timeout_s:g}s; pass a larger timeout (CLI: --timeout)")
        return left
