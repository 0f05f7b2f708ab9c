"""Instance states and the table of allowed transitions. Standard library only.

STOPPED    not running and nothing pending: never started, stopped by a user, or ended and the
           restart policy says leave it.
STARTING   a process exists; waiting for the first HTTP 200 from the health path (llama-server
           answers 503 while it loads the model).
RUNNING    the process answered 200 and keeps answering.
UNHEALTHY  was RUNNING; recent probes failed (refused, timeout, non-200) but fewer than
           `health.failures` in a row. Reaching that count means a hang: the process is killed.
BACKOFF    the process ended; the restart policy chose a delay; a new start follows it.
STOPPING   SIGTERM was sent to the process group; waiting for it to end (SIGKILL after the timeout).
FAILED     given up: too many ends within the burst window, a start that cannot succeed by retrying
           (preflight check, port taken), or a policy that does not restart. Only a user start
           leaves it.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FAILED = "failed"


class Outcome(StrEnum):
    """How a run ended; the restart policy decides on this."""

    CLEAN = "clean"  # exit status 0, not asked to stop
    CRASH = "crash"  # non-zero exit or killed by a signal we did not send
    HANG = "hang"  # health probes failed `failures` times in a row; we killed it
    START_FAILED = "start_failed"  # exited or timed out before the first 200
    FATAL = "fatal"  # cannot succeed by retrying: preflight failed, port taken, binary missing
    # An instance unit stopped or restarted by systemd on a user's word (`systemctl stop` or
    # `restart mi50d@NAME`), not by mi50d: the user's word stands, no restart policy applies.
    STOPPED_BY_SYSTEMD = "stopped_by_systemd"
    RESTARTED_BY_SYSTEMD = "restarted_by_systemd"


_ENDED = {State.BACKOFF, State.FAILED, State.STOPPED, State.STOPPING}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.FAILED}),
    State.STARTING: frozenset({State.RUNNING, *_ENDED}),
    State.RUNNING: frozenset({State.UNHEALTHY, *_ENDED}),
    State.UNHEALTHY: frozenset({State.RUNNING, *_ENDED}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
}

# States in which a process of the instance may exist.
ALIVE = frozenset({State.STARTING, State.RUNNING, State.UNHEALTHY, State.STOPPING})


class TransitionError(RuntimeError):
    pass


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"{old} -> {new} is not an allowed transition")
