"""Admission as a plain class on one event loop: FIFO, the queue bound, and the idle callback."""

from __future__ import annotations

import asyncio

import pytest

from contiguouskv.compute_server.admission import Admission, ResourceExhausted


def test_idle_is_called_once_the_last_running_request_ends_with_none_queued() -> None:
    async def scenario() -> tuple[list[str], list[int]]:
        events: list[str] = []
        idle_at: list[int] = []
        admission = Admission(1, 2, 1 << 30, on_idle=lambda: idle_at.append(len(events)))
        release_first = asyncio.Event()

        async def request(name: str, hold: asyncio.Event | None = None) -> None:
            async with admission.slot(10):
                events.append(f"{name} in")
                if hold is not None:
                    await hold.wait()
                await asyncio.sleep(0)
            events.append(f"{name} out")

        first = asyncio.create_task(request("a", release_first))
        await asyncio.sleep(0)
        queued = asyncio.create_task(request("b"))  # waits behind a
        await asyncio.sleep(0)
        assert idle_at == [] and admission.snapshot().queued == 1
        release_first.set()
        await asyncio.gather(first, queued)
        await request("c")  # alone: idle again when it ends
        return events, idle_at

    events, idle_at = asyncio.run(scenario())
    assert events == ["a in", "a out", "b in", "b out", "c in", "c out"]
    # not when a ended (b was queued and took its place); once after b, once after c
    assert idle_at == [3, 5]


def test_a_full_queue_refuses_naming_the_limit() -> None:
    async def scenario() -> None:
        admission = Admission(1, 0, 1 << 30)
        hold = asyncio.Event()

        async def holder() -> None:
            async with admission.slot(1):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="max_queued_requests=0"):
            async with admission.slot(1):
                pass
        hold.set()
        await task

    asyncio.run(scenario())
