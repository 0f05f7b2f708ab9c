"""A fan-out of daemon events (state changes, output lines) to any number of slow readers.

Publishing never blocks and never waits for a reader: each subscriber has a bounded queue, and a
reader that falls behind loses its oldest events (and is told how many), so `mi50ctl logs -f`
on a stalled terminal cannot slow the supervision loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

Event = dict[str, Any]


class Subscription:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()


class Hub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def publish(self, event: Event) -> None:
        for sub in self._subs:
            sub.offer(event)

    @contextlib.contextmanager
    def subscribe(self, size: int = 1000) -> Iterator[Subscription]:
        sub = Subscription(size)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
