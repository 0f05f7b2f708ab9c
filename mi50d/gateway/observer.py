"""What the gateway tells an observer (metrics) about requests, queues and swaps.

The gateway calls these from its event loop, synchronously: an implementation must not block
(update counters; never do I/O). `NullObserver` is the default. Token counts come from the
`usage` or `timings` object of the final JSON answer or the last SSE event, found in a bounded
tail of the response (`TokenTail`), never by buffering a whole answer.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Protocol

TAIL_BYTES = 8192
_PROMPT = re.compile(rb'"(?:prompt_tokens|prompt_n|input_tokens)"\s*:\s*(\d+)')
_GENERATED = re.compile(rb'"(?:completion_tokens|predicted_n|output_tokens)"\s*:\s*(\d+)')


class Observer(Protocol):
    def request_started(self, model: str) -> None: ...

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None: ...

    def queue_changed(self, model: str, depth: int) -> None: ...

    def in_flight_changed(self, model: str, n: int) -> None: ...

    def swap_finished(self, model: str, duration_s: float) -> None: ...


class NullObserver:
    """Observes nothing."""

    def request_started(self, model: str) -> None:
        pass

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None:
        pass

    def queue_changed(self, model: str, depth: int) -> None:
        pass

    def in_flight_changed(self, model: str, n: int) -> None:
        pass

    def swap_finished(self, model: str, duration_s: float) -> None:
        pass


class TokenTail:
    """The last `TAIL_BYTES` (at least) of a response, kept as the chunks that arrived (no copy
    per chunk); the token counts are read from it once, at the end."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= TAIL_BYTES:
            self._size -= len(self._chunks.popleft())

    def counts(self) -> tuple[int | None, int | None]:
        """(prompt tokens, generated tokens): the last value of each in the tail, or None."""
        tail = b"".join(self._chunks)[-TAIL_BYTES:]
        return _last(_PROMPT, tail), _last(_GENERATED, tail)


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None
