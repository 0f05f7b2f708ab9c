"""The wire format, without a daemon: request round trips per command, the error code chosen for
each kind of bad request, frame parsing on the client side, and the shared defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mi50d import config
from mi50d.control import protocol
from mi50d.control.protocol import (
    ErrorCode,
    ErrorFrame,
    ErrorInfo,
    EventFrame,
    ProtocolError,
    ResultFrame,
    encode,
    parse_frame,
    parse_request,
    request_line,
)


@pytest.mark.parametrize(("command", "args", "expected"), [
    ("status", {}, {"name": None}),
    ("status", {"name": "qwen3"}, {"name": "qwen3"}),
    ("start", {"name": "a"}, {"name": "a", "wait": True, "timeout_s": None}),
    ("start", {"name": "a", "wait": False, "timeout_s": 5}, {"name": "a", "wait": False,
                                                             "timeout_s": 5.0}),
    ("stop", {}, {"name": None}),
    ("restart", {"name": "b"}, {"name": "b"}),
    ("reload", {}, {}),
    ("logs", {"name": "a", "n": 3, "follow": True},
     {"name": "a", "n": 3, "follow": True, "chunked": False}),
    ("logs", {"name": "a", "chunked": True}, {"name": "a", "n": 50, "follow": False, "chunked": True}),
])
def test_request_round_trip(command: str, args: dict[str, Any], expected: dict[str, Any]) -> None:
    line = request_line(41, command, args)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    request = parse_request(line)
    assert (request.v, request.id, request.command) == (1, 41, command)
    assert request.args.model_dump() == expected


@pytest.mark.parametrize(("line", "code", "request_id", "message"), [
    (b"{", ErrorCode.BAD_REQUEST, None, "Invalid JSON"),
    (b"3", ErrorCode.BAD_REQUEST, None, "Input should be an object"),
    (b'{"id": 1, "command": "status"}', ErrorCode.BAD_REQUEST, None, "v: Field required"),
    (b'{"v": 1, "id": 1.5, "command": "status"}', ErrorCode.BAD_REQUEST, None, "id: "),
    (b'{"v": 9, "id": 2, "command": "status"}', ErrorCode.VERSION_MISMATCH, 2,
     "protocol version 9 is not spoken here; mi50d speaks 1"),
    (b'{"v": 1, "id": 3, "command": "kill"}', ErrorCode.UNKNOWN_COMMAND, 3,
     "unknown command 'kill'"),
    (b'{"v": 1, "id": 4, "command": "start", "args": {}}', ErrorCode.BAD_REQUEST, 4,
     "start.args.name: Field required"),
    (b'{"v": 1, "id": 5, "command": "start", "args": {"name": "a", "wait": "yes"}}',
     ErrorCode.BAD_REQUEST, 5, "start.args.wait: Input should be a valid boolean"),
    (b'{"v": 1, "id": 6, "command": "logs", "args": {"name": "a", "n": -1}}',
     ErrorCode.BAD_REQUEST, 6, "greater than or equal to 0"),
    (b'{"v": 1, "id": 7, "command": "reload", "args": {"force": true}}', ErrorCode.BAD_REQUEST,
     7, "reload.args.force: Extra inputs are not permitted"),
    (b'{"v": 1, "id": 8, "command": "status", "args": {"name": ""}}', ErrorCode.BAD_REQUEST, 8,
     "at least 1 character"),
    (b'{"v": 1, "id": 9, "command": "start", "args": {"name": "a", "timeout_s": 0}}',
     ErrorCode.BAD_REQUEST, 9, "greater than 0"),
])
def test_bad_requests_get_the_most_specific_code(line: bytes, code: ErrorCode,
                                                 request_id: int | None, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.code is code
    assert caught.value.request_id == request_id
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_frames_round_trip_and_are_told_apart() -> None:
    frames = [
        EventFrame(id=1, event={"lines": ["x"], "dropped": 0}),
        ResultFrame(id=1, result={"lines": []}),
        ResultFrame(id=2, result=None),
        ErrorFrame(id=None, error=ErrorInfo(code=ErrorCode.TOO_LARGE, message="too big")),
    ]
    for frame in frames:
        line = encode(frame)
        assert line.endswith(b"\n") and b"\n" not in line[:-1]
        back = parse_frame(line)
        assert type(back) is type(frame)
        assert back == frame
    assert encode(ErrorFrame(id=3, error=ErrorInfo(code="x", message="m"))) == (
        b'{"v":1,"id":3,"ok":false,"error":{"code":"x","message":"m","details":[]}}\n')


def test_client_refuses_another_protocol_version_and_garbage() -> None:
    with pytest.raises(ProtocolError) as newer:
        parse_frame(b'{"v": 2, "id": 1, "ok": true, "result": {}}\n')
    assert newer.value.code is ErrorCode.VERSION_MISMATCH
    assert "install matching versions" in newer.value.message
    with pytest.raises(ProtocolError) as garbage:
        parse_frame(b'{"v": 1, "id": 1, "ok": true}\n')
    assert garbage.value.message.startswith("malformed reply from mi50d")


def test_request_line_validates_before_sending() -> None:
    with pytest.raises(ValueError, match="name"):
        request_line(1, "start", {"wait": True})


def test_default_socket_is_shared_with_the_daemon_config() -> None:
    assert Path(protocol.DEFAULT_SOCKET) == config.DEFAULT_SOCKET
    assert config.DaemonConfig().socket == Path(protocol.DEFAULT_SOCKET)


def test_every_command_has_a_documented_handler() -> None:
    from mi50d.control.handlers import HANDLERS

    assert tuple(HANDLERS) == protocol.COMMANDS
    for name, command in HANDLERS.items():
        doc = command.run.__doc__ or ""
        assert doc.startswith(f"`{name} {{"), name  # the wire format comes first
        assert "-> " in doc
