"""The control-socket protocol, shared by mi50d and mi50ctl. Cheap to import: pydantic + stdlib.

Newline-delimited JSON over AF_UNIX. Each request is `{"v": 1, "id": N, "command": ..., "args": {...}}`;
each reply is `{"v": 1, "id": N, "ok": true, "result": ...}` or
`{"v": 1, "id": N, "ok": false, "error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

PROTOCOL_VERSION = 1


class InstanceStatus(BaseModel):
    """One instance as `mi50ctl status` shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: str
    reason: str = ""
    pid: int | None = None
    host: str
    port: int
    endpoint: str
    autostart: bool
    since: float  # wall-clock time of the last state change
    uptime_s: float | None = None  # seconds in running/unhealthy, None otherwise
    restarts: int = 0
    last_exit: str | None = None  # "exit 1", "signal 9 (SIGKILL)", ...
    gpus: tuple[int, ...] | None = None
    diagnosis: str | None = None
    last_lines: tuple[str, ...] = ()  # output kept with the last failure
