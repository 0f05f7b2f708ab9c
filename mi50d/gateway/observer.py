"""What the gateway tells an observer (metrics) about requests, queues and swaps.

The gateway calls these from its event loop, synchronously: an implementation must not block
(update counters; never do I/O). `NullObserver` is the default. Token counts come from the
`usage` or `timings` object of the final JSON answer or the last SSE event, found in a bounded
tail of the response (`TokenTail`), never by buffering a whole answer.
"""

from __future__ import annotations

import re
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
    """The last `TAIL_BYTES` of a response, from which the token counts are read at its end."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk)[-TAIL_BYTES:] if len(chunk) < TAIL_BYTES else (
            chunk[-TAIL_BYTES:])

    def counts(self) -> tuple[int | None, int | None]:
        """(prompt tokens, generated tokens): the last value of each in the tail, or None."""
        return _last(_PROMPT, self._tail), _last(_GENERATED, self._tail)


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None
