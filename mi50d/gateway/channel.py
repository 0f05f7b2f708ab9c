"""The line protocol between the daemon and its gateway front processes: one JSON object per
line over a socketpair. Messages, daemon to front: `state` (what the front may route itself,
with a sequence number). Front to daemon: `ack` (that state is in force, with the front's
requests in flight per instance at that moment), `counts` (requests in flight per instance, when
they changed) and `done` (finished requests, for the metrics), both coalesced per loop turn."""

from __future__ import annotations

import asyncio
import json
from typing import Any

Message = dict[str, Any]
# A state message carries every instance's route; a few hundred instances fit comfortably.
LINE_LIMIT = 4 << 20


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message; None at the end (the other side exited or closed it)."""
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError):
        return None
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"not a message: {line[:200]!r}")
    return message
