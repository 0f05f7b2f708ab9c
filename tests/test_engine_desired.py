"""The request table of engine/desired.py, as a table: which later request supersedes which
pending one, and that a ticket the caller gave up on says `timeout` without withdrawing anything.
No processes: tickets and the pending list alone (they need a running event loop)."""

from __future__ import annotations

import pytest

from mi50d.engine.desired import SUPERSEDES, Kind, Pending, Ticket, Verdict
from mi50d.engine.states import State

pytestmark = pytest.mark.asyncio


def _ticket(kind: Kind) -> Ticket:
    return Ticket(kind, lambda: (State.STARTING, "loading"))


@pytest.mark.parametrize(("first", "later", "superseded"), [
    (Kind.START, Kind.STOP, True),  # a stop always wins over an earlier start
    (Kind.RESTART, Kind.STOP, True),
    (Kind.START, Kind.CLOSE, True),
    (Kind.STOP, Kind.START, True),  # a start after a stop wins over that stop
    (Kind.STOP, Kind.RESTART, True),
    (Kind.START, Kind.START, False),  # both wait for the same running
    (Kind.START, Kind.RESTART, False),
    (Kind.STOP, Kind.STOP, False),
    (Kind.STOP, Kind.CLOSE, False),  # a close stops too
    (Kind.START, Kind.RECONFIGURE, False),  # a reload does not answer a start: running does
    (Kind.RECONFIGURE, Kind.STOP, False),
])
async def test_supersedes(first: Kind, later: Kind, superseded: bool) -> None:
    pending = Pending()
    a, b = _ticket(first), _ticket(later)
    pending.add(a)
    pending.add(b)
    assert a.done() is superseded
    assert not b.done()
    if superseded:
        reply = await a.wait(0)
        assert reply.verdict is Verdict.SUPERSEDED and reply.reason == f"superseded by a later {later}"
    assert (first in SUPERSEDES[later]) is superseded


async def test_resolve_answers_only_the_kinds_named() -> None:
    pending = Pending()
    start, stop = _ticket(Kind.START), _ticket(Kind.RECONFIGURE)
    pending.add(start)
    pending.add(stop)
    pending.resolve({Kind.START}, Verdict.REACHED, State.RUNNING, "/health answered 200")
    assert (await start.wait()).ok and not stop.done()
    assert pending.waiting(Kind.RECONFIGURE) and not pending.waiting(Kind.START)


async def test_a_wait_that_times_out_says_so_and_leaves_the_list() -> None:
    pending = Pending()
    start = _ticket(Kind.START)
    pending.add(start)
    reply = await start.wait(0.01)
    assert reply.verdict is Verdict.TIMEOUT and reply.state is State.STARTING
    assert "still wanted" in reply.reason and "loading" in reply.reason
    assert not pending.waiting(Kind.START)
    # resolving later is harmless: the caller already has its answer
    pending.resolve({Kind.START}, Verdict.REACHED, State.RUNNING, "ok")
    assert (await start.wait()).verdict is Verdict.TIMEOUT
