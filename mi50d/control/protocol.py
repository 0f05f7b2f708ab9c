"""The control-socket protocol, shared by mi50d and mi50ctl. Cheap to import: pydantic + stdlib.

Wire format: newline-delimited JSON (UTF-8) over an AF_UNIX stream socket, one object per line, at
most `MAX_LINE` bytes including the newline. A connection carries requests one after another.

Request::

    {"v": 1, "id": 7, "command": "status", "args": {"name": "qwen3"}}

`args` may be omitted when every argument has a default. The per-command argument models are below
(`StatusArgs`, ...); `Request` is their discriminated union on `command`.

Replies to a request carry its `id`. A request gets zero or more *event* frames, then exactly one
*final* frame (a result or an error)::

    {"v": 1, "id": 7, "ok": true, "event": {...}}                    progress, log lines (streams)
    {"v": 1, "id": 7, "ok": true, "result": {...}}                   final: success
    {"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "one line", "details": []}}

`check` and `doctor` run the host checks in mi50d, as the account instances run as (see
`mi50d.control.checks`). Only `start` (with `wait`) and `logs` (with `follow`) send events;
`logs --follow` never sends a final frame: it streams until the client disconnects. A request
that cannot be parsed gets an error with `id` null (or the id, if it could be read); a line over
`MAX_LINE` gets `too_large` and the connection is closed, since the rest of that line cannot be
told from the next request.

A client that may not connect now gets one error frame with `id` null before the connection is
closed, without its request being read: `too_many_clients` (its uid holds too many connections) or
`busy` (mi50d is out of file descriptors).

Versions: a new command is an addition, not a new version: an older mi50d answers it with
`unknown_command`, which mi50ctl handles (`check` and `doctor` then run locally). The version
changes only when an existing command or frame changes meaning; then both sides refuse the other.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024
MAX_NAME = 200  # characters in an instance name on the wire
MAX_TIMEOUT_S = 7 * 24 * 3600
# The daemon's default socket when mi50d.toml says nothing (mirrors config.DEFAULT_SOCKET, which a
# test keeps equal); the Debian package's mi50d.socket listens on the same path.
DEFAULT_SOCKET = "/run/mi50d/control.sock"


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # not JSON, not an object, wrong field types
    UNKNOWN_COMMAND = "unknown_command"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"  # a line over MAX_LINE; the connection is closed
    UNKNOWN_INSTANCE = "unknown_instance"
    CONFIG_ERROR = "config_error"  # reload rejected; `details` lists every problem
    INTERNAL = "internal"  # a bug in mi50d; the traceback is in the daemon's journal
    TOO_MANY_CLIENTS = "too_many_clients"  # this uid holds too many connections; closed after
    BUSY = "busy"  # mi50d is out of file descriptors; closed after, try again shortly


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Args(_Model):
    # Requests come from other programs: "1" is not 1, and true is not 1 either.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---- data ----------------------------------------------------------------------------------------


class InstanceStatus(_Model):
    """One instance as `mi50ctl status` shows it."""

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
    vram: dict[int, int] = Field(default_factory=dict)  # bytes held per GPU index, when known
    diagnosis: str | None = None
    last_lines: tuple[str, ...] = ()  # output kept with the last failure
    on_demand: bool = False  # the gateway starts and stops it
    in_flight: int = 0  # gateway requests being answered now
    last_used: float | None = None  # wall-clock end of its last gateway request


class DaemonInfo(_Model):
    version: str
    protocol: int = PROTOCOL_VERSION
    pid: int
    config_dir: str
    socket: str
    uptime_s: float
    gateway: str | None = None  # the gateway's URL, when [gateway] listen is set


# ---- requests ------------------------------------------------------------------------------------

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]


class StatusArgs(_Args):
    name: Name | None = None  # None: every instance


class StartArgs(_Args):
    name: Name
    wait: bool = True  # stream progress events until running, failed or timeout_s
    timeout_s: Timeout | None = None  # None: until the instance's own start_timeout_s decides


class StopArgs(_Args):
    name: Name | None = None  # None: every instance


class RestartArgs(_Args):
    name: Name | None = None  # None: every instance


class ReloadArgs(_Args):
    pass


class LogsArgs(_Args):
    name: Name
    n: Annotated[int, Field(ge=0, le=100_000)] = 50
    follow: bool = False
    # Without follow: send the lines as LogsChunk events of bounded size and an empty result,
    # instead of one result frame holding them all. Added later; older clients leave it out.
    chunked: bool = False


class CheckArgs(_Args):
    name: Name


class DoctorArgs(_Args):
    pass


class _Request(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: int
    id: int


class StatusRequest(_Request):
    command: Literal["status"]
    args: StatusArgs = StatusArgs()


class StartRequest(_Request):
    command: Literal["start"]
    args: StartArgs


class StopRequest(_Request):
    command: Literal["stop"]
    args: StopArgs = StopArgs()


class RestartRequest(_Request):
    command: Literal["restart"]
    args: RestartArgs = RestartArgs()


class ReloadRequest(_Request):
    command: Literal["reload"]
    args: ReloadArgs = ReloadArgs()


class LogsRequest(_Request):
    command: Literal["logs"]
    args: LogsArgs


class CheckRequest(_Request):
    command: Literal["check"]
    args: CheckArgs


class DoctorRequest(_Request):
    command: Literal["doctor"]
    args: DoctorArgs = DoctorArgs()


Request = Annotated[
    StatusRequest | StartRequest | StopRequest | RestartRequest | ReloadRequest | LogsRequest
    | CheckRequest | DoctorRequest,
    Field(discriminator="command"),
]
_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
COMMANDS = ("status", "start", "stop", "restart", "reload", "logs", "check", "doctor")


class _Envelope(BaseModel):
    """What is checked before the command's own model: version, id and a known command."""

    model_config = ConfigDict(strict=True)

    v: int
    id: int
    command: str


# ---- results and events --------------------------------------------------------------------------


class GpuStatus(_Model):
    """One GPU as sysfs shows it (no rocm-smi): index = ROCR_VISIBLE_DEVICES index."""

    index: int
    gfx: str
    card: str | None = None
    pci: str | None = None
    vram_total: int | None = None  # bytes
    vram_used: int | None = None  # bytes
    busy_percent: int | None = None
    temperatures_c: dict[str, float] = Field(default_factory=dict)  # edge, junction, mem
    power_w: float | None = None


class StatusResult(_Model):
    daemon: DaemonInfo
    instances: list[InstanceStatus]
    gpus: list[GpuStatus] = Field(default_factory=list)


class StartProgress(_Model):
    """An event of `start` with `wait`: sent on each state change, output line (rate-limited) and
    about once a second while nothing happens."""

    name: str
    state: str
    reason: str
    elapsed_s: float
    line: str | None = None  # the latest output line


class StartResult(_Model):
    # running: it answered 200; failed: it gave up (or stopped); timeout: timeout_s passed while
    # it was still starting (it keeps starting); requested: `wait` was false.
    outcome: Literal["running", "failed", "timeout", "requested"]
    status: InstanceStatus
    elapsed_s: float = 0.0
    # With "failed": set when the start did not fail but was overtaken, e.g. "superseded by a
    # later stop" or the instance's removal by a reload. Added later; absent from older daemons.
    superseded: str | None = None


class InstancesResult(_Model):
    """The result of `stop` and `restart`: the instances acted on, after acting."""

    instances: list[InstanceStatus]


class ReloadResult(_Model):
    added: list[str]
    removed: list[str]
    restarted: list[str]
    unchanged: list[str]


class LogsChunk(_Model):
    """An event of `logs` with `follow`: the backlog first, then new lines as they come.
    `dropped` counts lines this reader lost by falling behind since the previous chunk."""

    lines: list[str]
    dropped: int = 0


class LogsResult(_Model):
    name: str
    lines: list[str]


class CheckInfo(_Model):
    """One check (`mi50d.host.checks.Check` on the wire)."""

    name: str
    status: Literal["ok", "warn", "fail", "skip"]
    message: str
    fix: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class CheckedAs(_Model):
    """Who ran the checks: mi50d itself, as the account its instances run as."""

    pid: int
    account: str  # the instances' account (the daemon's own when it is not root)
    config_dir: str  # the files checked, read from disk at the time of the request


class CheckResult(_Model):
    """`check NAME`: the instance's preflight. `problems` is set (and `checks` empty) when the
    configuration directory does not load."""

    checked_as: CheckedAs
    instance: str
    checks: list[CheckInfo]
    problems: list[str] = Field(default_factory=list)


class DoctorResult(_Model):
    """`doctor`: the host checklist and every instance's preflight."""

    checked_as: CheckedAs
    host: list[CheckInfo]
    instances: dict[str, list[CheckInfo]] = Field(default_factory=dict)


# ---- frames --------------------------------------------------------------------------------------


class ErrorInfo(_Model):
    code: str
    message: str  # one line
    details: list[str] = []  # e.g. every problem of a rejected reload


class ResultFrame(_Model):
    v: int = PROTOCOL_VERSION
    id: int | None
    ok: Literal[True] = True
    result: Any


class EventFrame(_Model):
    v: int = PROTOCOL_VERSION
    id: int | None
    ok: Literal[True] = True
    event: dict[str, Any]


class ErrorFrame(_Model):
    v: int = PROTOCOL_VERSION
    id: int | None
    ok: Literal[False] = False
    error: ErrorInfo


Frame = EventFrame | ResultFrame | ErrorFrame
_FRAME: TypeAdapter[Frame] = TypeAdapter(Frame)


class ProtocolError(Exception):
    """A request or reply that breaks the protocol; `code` is an ErrorCode value."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None,
                 details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details or []


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])


def encode(frame: BaseModel) -> bytes:
    """One frame as a line: compact JSON plus a newline."""
    return frame.model_dump_json().encode() + b"\n"


def request_line(request_id: int, command: str, args: dict[str, Any] | None = None) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": request_id, "command": command, "args": args or {}}
    return _REQUEST.dump_json(_REQUEST.validate_python(body)) + b"\n"


def parse_request(line: bytes) -> Request:
    """Validate one request line; raise ProtocolError with the most specific code."""
    try:
        envelope = _Envelope.model_validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, _first_error(exc)) from None
    if envelope.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"protocol version {envelope.v} is not spoken here; mi50d speaks "
                            f"{PROTOCOL_VERSION}", envelope.id)
    if envelope.command not in COMMANDS:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                            f"unknown command {envelope.command[:60]!r}; known: "
                            f"{', '.join(COMMANDS)}", envelope.id)
    try:
        return _REQUEST.validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, _first_error(exc), envelope.id) from None


def parse_frame(line: bytes) -> Frame:
    """Validate one reply line (client side); a frame of another protocol version is refused."""
    try:
        frame = _FRAME.validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed reply from mi50d: "
                            f"{_first_error(exc)}") from None
    if frame.v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"mi50d speaks protocol {frame.v}, this mi50ctl {PROTOCOL_VERSION}; "
                            "install matching versions")
    return frame
