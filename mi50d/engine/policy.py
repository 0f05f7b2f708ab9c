"""Restart decisions as pure functions of (policy, outcome, history, now). No I/O, no clock.

- `never` never restarts; `on-failure` restarts after crashes, hangs and failed starts but not
  after a clean exit; `always` restarts after every end that a user did not ask for.
- A unit stopped or restarted through systemd (`systemctl stop|restart mi50d@NAME`) is a user's
  word, not an end: stopped stays stopped, restarted is taken up again at once, and neither
  counts towards the streak or the burst.
- An outcome of FATAL (preflight failed, port taken) is never retried: retrying cannot help.
- The delay doubles from `delay_s` up to `max_delay_s` with each end in a row; a run that stayed
  healthy for at least `max_delay_s` (and at least STABLE_FLOOR_S) resets the streak.
- More than `burst` ends within `interval_s` means flapping: give up (FAILED), like circus's
  flapping rule and systemd's StartLimitBurst.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mi50d.config import RestartConfig
from mi50d.engine.states import Outcome

STABLE_FLOOR_S = 10.0


@dataclass(frozen=True)
class History:
    """What the policy remembers of an instance: times of recent ends and the current streak."""

    ends: tuple[float, ...] = ()
    streak: int = 0


@dataclass(frozen=True)
class Decision:
    delay_s: float | None  # None: do not restart
    reason: str
    history: History


def is_stable(healthy_for_s: float, policy: RestartConfig) -> bool:
    return healthy_for_s >= max(policy.max_delay_s, STABLE_FLOOR_S)


def backoff(streak: int, policy: RestartConfig) -> float:
    """Delay before the `streak`-th restart in a row (streak >= 1)."""
    return float(min(policy.max_delay_s, policy.delay_s * 2 ** max(streak - 1, 0)))


def recent(ends: Sequence[float], now: float, window_s: float) -> tuple[float, ...]:
    return tuple(t for t in ends if now - t < window_s)


def decide(
    policy: RestartConfig,
    outcome: Outcome,
    history: History,
    now: float,
    healthy_for_s: float = 0.0,
) -> Decision:
    """Record an end at `now` and say whether, and after how long, to start again."""
    if outcome is Outcome.STOPPED_BY_SYSTEMD:
        return Decision(None, "not restarted: stopped through systemd", history)
    if outcome is Outcome.RESTARTED_BY_SYSTEMD:
        return Decision(0.0, "restarted through systemd: following its new process", history)
    streak = 1 if is_stable(healthy_for_s, policy) else history.streak + 1
    ends = (*recent(history.ends, now, policy.interval_s), now)
    updated = History(ends=ends, streak=streak)
    if outcome is Outcome.FATAL:
        return Decision(None, "not retried: retrying cannot fix this", updated)
    if policy.policy == "never":
        return Decision(None, "restart policy is 'never'", updated)
    if policy.policy == "on-failure" and outcome is Outcome.CLEAN:
        return Decision(None, "exited cleanly and restart policy is 'on-failure'", updated)
    if len(ends) > policy.burst:
        return Decision(
            None,
            f"{len(ends)} ends within {policy.interval_s:g}s (burst {policy.burst}); giving up",
            updated,
        )
    delay = backoff(streak, policy)
    return Decision(delay, f"restart #{streak} in a row after {delay:g}s", updated)
