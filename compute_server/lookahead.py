"""The server's look-ahead thread(s): policies' work on layer ``l + 1`` while a request runs layer ``l``.

``contiguous+`` decodes, scores and ships layer ``l + 1``'s speculative selection there
(:class:`~.policies.identified.IdentifiedPolicy`), so that it uses a core the request's thread does
not. A request that reaches ``l + 1`` before the thread has begun the work takes it back and runs it
itself, so the same chunks ship whatever the thread's backlog. :class:`LookAhead` counts where each
piece of work ran (``ckv_compute_look_ahead_runs``): many runs on the request's thread mean the
look-ahead threads do not keep up, or that there are none (``look_ahead_threads`` 0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec

P = ParamSpec("P")


@dataclass(frozen=True)
class LookAheadStats:
    """Look-ahead work since the server started, by the thread that ran it."""

    on_thread: int  # ran on a look-ahead thread
    on_request: int  # ran on the request's own thread (no look-ahead thread, or taken back unbegun)


class LookAhead:
    """``threads`` look-ahead threads (0: every look-ahead runs on its request's thread); thread-safe."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ahead") if threads else None
        self._lock = threading.Lock()
        self._on_thread = 0
        self._on_request = 0

    @property
    def has_threads(self) -> bool:
        """Whether there is a look-ahead thread to :meth:`submit` to."""
        return self._pool is not None

    def submit(self, fn: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> Future[None]:
        """Run ``fn`` on a look-ahead thread; the future can be cancelled until it begins (then run
        it with :meth:`run_here`). Only when :attr:`has_threads`."""
        if self._pool is None:
            raise RuntimeError("no look-ahead thread: run the work with run_here")

        def counted() -> None:
            with self._lock:
                self._on_thread += 1
            fn(*args, **kwargs)

        return self._pool.submit(counted)

    def run_here(self, fn: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``fn`` on the calling (request's) thread."""
        with self._lock:
            self._on_request += 1
        fn(*args, **kwargs)

    def stats(self) -> LookAheadStats:
        with self._lock:
            return LookAheadStats(self._on_thread, self._on_request)

    def shutdown(self) -> None:
        """Stop the threads; work not yet begun is dropped (its requests are ending too)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
