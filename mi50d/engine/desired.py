"""What a control request asks of an instance, and when its reply is due. Standard library only,
plus the state table.

One owner per instance: a request (start, stop, restart, a reload's reconfigure or removal, the
daemon's shutdown, the gateway's ensure_running/ensure_stopped) never touches a process. It only
records the instance's *goal* and returns a `Ticket` at once; the instance's own loop is the only
code that runs preflight, spawns, signals or swaps the configuration, and it reconciles what runs
with the goal, in the order the requests came.

| request     | goal after     | interrupts | ticket resolves                            | supersedes     |
|-------------|----------------|------------|--------------------------------------------|----------------|
| start       | UP             | no         | RUNNING; `failed` once it gives up         | stop           |
| restart     | UP, fresh      | yes        | a new attempt begins (STARTING)            | stop           |
| stop        | DOWN           | yes        | no process left (STOPPED or FAILED)        | start, restart |
| reconfigure | unchanged      | yes        | the new configuration is in place          | nothing        |
| close       | CLOSED (final) | yes        | no process left and the loop has returned  | start, restart |

"interrupts": the request ends the current attempt (preflight, loading, running, backoff) at
once; the loop then starts over from the goal.

So a stop always wins over a start that came before it, and a start after a stop wins over that
stop; the earlier ticket says `superseded` and by what. Requests are recorded synchronously (no
await between a request and its effect on the goal), so none can be lost or reordered. A caller
that stops waiting (`Ticket.wait`'s timeout) gets `timeout`; the request itself stands. When the
loop gives up on its own (restart policy, a fatal cause, an internal error), the goal becomes DOWN
and pending starts resolve `failed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from mi50d.engine.states import State


class Goal(StrEnum):
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


class Kind(StrEnum):
    """What a ticket waits for."""

    START = "start"
    RESTART = "restart"
    STOP = "stop"
    RECONFIGURE = "reconfigure"
    CLOSE = "close"


# A later request of the key kind supersedes every pending ticket of these kinds.
SUPERSEDES: dict[Kind, frozenset[Kind]] = {
    Kind.START: frozenset({Kind.STOP}),
    Kind.RESTART: frozenset({Kind.STOP}),
    Kind.STOP: frozenset({Kind.START, Kind.RESTART}),
    Kind.RECONFIGURE: frozenset(),
    Kind.CLOSE: frozenset({Kind.START, Kind.RESTART}),
}


# The reason of the STOPPING/STOPPED that a request's interrupt causes.
INTERRUPTED_BY: dict[Kind, str] = {
    Kind.START: "started on request",  # a start never interrupts; here for completeness
    Kind.STOP: "stopped on request",
    Kind.RESTART: "restarting on request",
    Kind.RECONFIGURE: "restarting with the changed configuration (reload)",
    Kind.CLOSE: "stopped: removed by a reload or the daemon is stopping",
}


class Verdict(StrEnum):
    REACHED = "reached"  # the state asked for was reached
    FAILED = "failed"  # the instance gave up (failed, or ended and the policy left it down)
    SUPERSEDED = "superseded"  # a later request asked for the opposite first
    REMOVED = "removed"  # a reload removed the instance, or the daemon is stopping
    TIMEOUT = "timeout"  # not reached within the caller's timeout; the request stands


@dataclass(frozen=True)
class Reply:
    """The answer to one request: the verdict, the instance's state then, and why (one line)."""

    verdict: Verdict
    state: State
    reason: str

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.REACHED


class Ticket:
    """One request's pending reply. `wait(timeout_s)` never raises for the outcome."""

    def __init__(self, kind: Kind, now: Callable[[], tuple[State, str]]) -> None:
        self.kind = kind
        self.current = now
        self._future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return self._future.done()

    def resolve(self, verdict: Verdict, state: State, reason: str) -> None:
        if not self._future.done():
            self._future.set_result(Reply(verdict, state, reason))

    async def wait(self, timeout_s: float | None = None) -> Reply:
        """The reply, or `timeout` once `timeout_s` passed (None: until it resolves)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(self._future)
        except TimeoutError:
            state, reason = self.current()
            self.resolve(Verdict.TIMEOUT, state, reason)  # leaves the pending list
            return Reply(Verdict.TIMEOUT, state,
                         f"not done within {timeout_s:g}s (still wanted); now: {reason}")


class Pending:
    """The tickets of one instance that are not resolved yet."""

    def __init__(self) -> None:
        self._tickets: list[Ticket] = []

    def add(self, ticket: Ticket) -> None:
        self._tickets = [t for t in self._tickets if not t.done()]
        for earlier in self._tickets:
            if earlier.kind in SUPERSEDES[ticket.kind]:
                state, _ = earlier.current()
                earlier.resolve(Verdict.SUPERSEDED, state, f"superseded by a later {ticket.kind}")
        self._tickets.append(ticket)

    def resolve(self, kinds: Iterable[Kind], verdict: Verdict, state: State, reason: str) -> None:
        wanted = frozenset(kinds)
        for ticket in self._tickets:
            if ticket.kind in wanted:
                ticket.resolve(verdict, state, reason)
        self._tickets = [t for t in self._tickets if not t.done()]

    def waiting(self, kind: Kind) -> bool:
        return any(t.kind is kind and not t.done() for t in self._tickets)
