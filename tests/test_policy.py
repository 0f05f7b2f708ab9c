"""The restart policy and the state table: pure functions, no event loop."""

from __future__ import annotations

import pytest

from mi50d.config import RestartConfig
from mi50d.engine.policy import History, backoff, decide
from mi50d.engine.states import TRANSITIONS, Outcome, State, TransitionError, check_transition

ALWAYS = RestartConfig(policy="always", delay_s=1, max_delay_s=8, burst=5, interval_s=60)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, ALWAYS) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def test_consecutive_failures_grow_the_delay() -> None:
    h = History()
    delays = []
    for t in (0.0, 1.0, 3.0, 7.0):
        d = decide(ALWAYS, Outcome.CRASH, h, now=t)
        h = d.history
        delays.append(d.delay_s)
    assert delays == [1, 2, 4, 8]


def test_a_stable_run_resets_the_streak() -> None:
    h = decide(ALWAYS, Outcome.CRASH, History(), now=0).history
    h = decide(ALWAYS, Outcome.CRASH, h, now=1).history
    assert h.streak == 2
    d = decide(ALWAYS, Outcome.CRASH, h, now=100, healthy_for_s=10)
    assert (d.delay_s, d.history.streak) == (1, 1)


def test_short_healthy_run_does_not_reset() -> None:
    h = decide(ALWAYS, Outcome.CRASH, History(), now=0).history
    d = decide(ALWAYS, Outcome.CRASH, h, now=1, healthy_for_s=2)
    assert d.history.streak == 2


def test_more_than_burst_within_interval_gives_up() -> None:
    h = History()
    results = []
    for t in range(6):
        d = decide(ALWAYS, Outcome.CRASH, h, now=float(t))
        h = d.history
        results.append(d.delay_s is not None)
    assert results == [True] * 5 + [False]
    assert "6 ends within 60s (burst 5)" in d.reason


def test_ends_outside_the_window_are_forgotten() -> None:
    h = History(ends=(0.0, 1.0, 2.0, 3.0, 4.0))
    d = decide(ALWAYS, Outcome.CRASH, h, now=200.0)
    assert d.delay_s is not None
    assert d.history.ends == (200.0,)


@pytest.mark.parametrize(
    ("policy", "outcome", "restarts"),
    [
        ("never", Outcome.CRASH, False),
        ("never", Outcome.CLEAN, False),
        ("on-failure", Outcome.CLEAN, False),
        ("on-failure", Outcome.CRASH, True),
        ("on-failure", Outcome.HANG, True),
        ("on-failure", Outcome.START_FAILED, True),
        ("always", Outcome.CLEAN, True),
        ("always", Outcome.FATAL, False),
        ("on-failure", Outcome.FATAL, False),
    ],
)
def test_policy_table(policy: str, outcome: Outcome, restarts: bool) -> None:
    conf = RestartConfig.model_validate({"policy": policy})
    assert (decide(conf, outcome, History(), now=0).delay_s is not None) is restarts


def test_every_state_has_a_row_and_failed_needs_a_user() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.FAILED] == {State.STARTING, State.STOPPED}
    check_transition(State.STARTING, State.RUNNING)
    with pytest.raises(TransitionError):
        check_transition(State.STOPPED, State.RUNNING)
    with pytest.raises(TransitionError):
        check_transition(State.BACKOFF, State.RUNNING)


@pytest.mark.parametrize("policy", ["never", "on-failure", "always"])
def test_a_stop_through_systemd_is_never_undone(policy: str) -> None:
    h = History(ends=(0.0,), streak=1)
    d = decide(RestartConfig.model_validate({"policy": policy}), Outcome.STOPPED_BY_SYSTEMD, h, now=1.0)
    assert d.delay_s is None
    assert "stopped through systemd" in d.reason
    assert d.history == h  # a user's word, not an end: no streak, no burst


@pytest.mark.parametrize("policy", ["never", "on-failure", "always"])
def test_a_restart_through_systemd_is_followed_at_once_and_not_counted(policy: str) -> None:
    h = History(ends=(0.0, 1.0, 2.0, 3.0, 4.0), streak=5)  # one more crash would give up
    conf = RestartConfig.model_validate({"policy": policy, "burst": 5})
    d = decide(conf, Outcome.RESTARTED_BY_SYSTEMD, h, now=5.0)
    assert d.delay_s == 0.0
    assert d.history == h
