"""A fan-out of daemon events (state changes, output lines) to any number of slow readers.

Publishing never blocks and never waits for a reader: each subscriber has a queue bounded in
events and in the bytes of the output lines it holds, and a reader that falls behind loses its
oldest events (and is told how many), so `mi50ctl logs -f` on a stalled terminal can neither slow
the supervision loop nor grow the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

Event = dict[str, Any]


MAX_QUEUED_BYTES = 8 * 1024 * 1024


def _cost(event: Event) -> int:
    line = event.get("line")
    return 64 + (len(line) if isinstance(line, str) else 0)


class Subscription:
    def __init__(self, size: int, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0

    def offer(self, event: Event) -> None:
        cost = _cost(event)
        while not self.queue.empty() and (self.queue.full()
                                          or self.bytes + cost > self.max_bytes):
            self.bytes -= _cost(self.queue.get_nowait())
            self.dropped += 1
        self.queue.put_nowait(event)
        self.bytes += cost

    def take_nowait(self) -> Event:
        event = self.queue.get_nowait()
        self.bytes -= _cost(event)
        return event

    async def get(self) -> Event:
        event = await self.queue.get()
        self.bytes -= _cost(event)
        return event


class Hub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def publish(self, event: Event) -> None:
        for sub in self._subs:
            sub.offer(event)

    @contextlib.contextmanager
    def subscribe(self, size: int = 1000,
                  max_bytes: int = MAX_QUEUED_BYTES) -> Iterator[Subscription]:
        sub = Subscription(size, max_bytes)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
