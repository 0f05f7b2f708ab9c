"""An instance's kept output: the last lines, bounded in bytes as well as in count.

llama-server's own lines are short; a child that prints megabytes without a newline (or a binary
blob) must not grow the daemon. Each line is cut to `MAX_LINE_BYTES` (saying how much was cut)
before it is kept, logged or published, and the buffer drops its oldest lines beyond
`MAX_KEPT_BYTES` in all, so `mi50ctl logs` replies are bounded too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

MAX_LINE_BYTES = 16 * 1024
MAX_KEPT_BYTES = 4 * 1024 * 1024


def cut(raw: bytes, skipped: int = 0) -> str:
    """One output line as text: its first bytes (`raw`, at most MAX_LINE_BYTES) and a note of
    the `skipped` bytes after them that were not kept."""
    text = raw.rstrip(b"\r").decode("utf-8", "replace")
    return f"{text} [mi50d: {skipped} bytes cut]" if skipped else text


class Lines:
    """The newest lines, at most `max_lines` of them and `max_bytes` (UTF-8) in all."""

    def __init__(self, max_lines: int, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[tuple[str, int]] = deque()
        self.bytes = 0

    def append(self, line: str) -> None:
        size = len(line.encode("utf-8", "surrogateescape")) + 1
        self._lines.append((line, size))
        self.bytes += size
        while self._lines and (len(self._lines) > self.max_lines or self.bytes > self.max_bytes):
            _, gone = self._lines.popleft()
            self.bytes -= gone

    def resize(self, max_lines: int) -> None:
        self.max_lines = max_lines
        while len(self._lines) > max_lines:
            _, gone = self._lines.popleft()
            self.bytes -= gone

    def tail(self, n: int) -> list[str]:
        """The last `n` lines (all of them when n exceeds the count; none for n <= 0)."""
        if n <= 0:
            return []
        count = len(self._lines)
        return [line for i, (line, _) in enumerate(self._lines) if i >= count - n]

    def __iter__(self) -> Iterator[str]:
        return (line for line, _ in self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def __bool__(self) -> bool:
        return bool(self._lines)
