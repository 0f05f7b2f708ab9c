"""The result of one host or instance check, shared by preflight, doctor and `mi50ctl`.

A `Check` is one line a person can act on: what was checked, how it went, why, and the fix. Library
code returns lists of them; only the CLI renders them. Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip"]

_RANK: dict[Status, int] = {"skip": 0, "ok": 1, "warn": 2, "fail": 3}


@dataclass(frozen=True)
class Check:
    """One checked fact. `fix` is set whenever `status` is warn or fail and a fix is known."""

    name: str
    status: Status
    message: str
    fix: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def line(self) -> str:
        """`name: message; fix: ...` on one line, for logs and state reasons."""
        text = f"{self.name}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message,
                "fix": self.fix, "data": dict(self.data)}


class Transient(str):
    """A preflight failure that can pass later without a change here (an RPC worker that is not
    up yet): the restart policy retries it, where any other failed check stops the instance."""


def ok(name: str, message: str, **data: Any) -> Check:
    return Check(name, "ok", message, None, data)


def warn(name: str, message: str, fix: str | None, **data: Any) -> Check:
    return Check(name, "warn", message, fix, data)


def fail(name: str, message: str, fix: str | None, **data: Any) -> Check:
    return Check(name, "fail", message, fix, data)


def skip(name: str, message: str, **data: Any) -> Check:
    return Check(name, "skip", message, None, data)


def worst(checks: Iterable[Check]) -> Status:
    """The most serious status among `checks`; "ok" for none."""
    statuses = [c.status for c in checks]
    return max(statuses, key=_RANK.__getitem__, default="ok")


def failures(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.failed]
