"""The wire format's additions for the socket's defences, without a daemon: `check` and `doctor`
requests and results, the refusal codes, and replies whose strings are not valid Unicode."""

from __future__ import annotations

import json
import os

import pytest

from mi50d.control.protocol import (
    COMMANDS,
    MAX_NAME,
    CheckedAs,
    CheckInfo,
    CheckResult,
    ErrorCode,
    ErrorFrame,
    ErrorInfo,
    ProtocolError,
    ResultFrame,
    parse_frame,
    parse_request,
    request_line,
)
from mi50d.control.server import frame_bytes


def test_check_and_doctor_requests_round_trip() -> None:
    check = parse_request(request_line(3, "check", {"name": "qwen3"}))
    assert check.command == "check" and check.args.model_dump() == {"name": "qwen3"}
    doctor = parse_request(b'{"v": 1, "id": 4, "command": "doctor"}\n')
    assert doctor.command == "doctor" and doctor.args.model_dump() == {}
    assert COMMANDS[-2:] == ("check", "doctor")


@pytest.mark.parametrize("line", [
    b'{"v": 1, "id": 5, "command": "check"}\n',  # a name is required
    b'{"v": 1, "id": 5, "command": "check", "args": {"name": ""}}\n',
    b'{"v": 1, "id": 5, "command": "check", "args": {"name": "%s"}}\n' % (b"a" * (MAX_NAME + 1)),
    b'{"v": 1, "id": 5, "command": "doctor", "args": {"config_dir": "/tmp"}}\n',  # never a dir
])
def test_bad_check_and_doctor_requests(line: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.code == ErrorCode.BAD_REQUEST and caught.value.request_id == 5


def test_a_check_result_parses_on_the_client() -> None:
    result = CheckResult(checked_as=CheckedAs(pid=1, account="mi50d", config_dir="/etc/mi50d"),
                         instance="a", checks=[CheckInfo(name="model", status="fail",
                                                         message="x", fix="y")])
    frame = parse_frame(frame_bytes(ResultFrame(id=1, result=result.model_dump(mode="json"))))
    assert isinstance(frame, ResultFrame)
    assert CheckResult.model_validate(frame.result) == result


def test_refusal_frames_parse_on_the_client() -> None:
    for code in (ErrorCode.TOO_MANY_CLIENTS, ErrorCode.BUSY):
        frame = parse_frame(frame_bytes(ErrorFrame(id=None, error=ErrorInfo(
            code=code, message="why"))))
        assert isinstance(frame, ErrorFrame) and frame.id is None and frame.error.code == code


def test_a_reply_with_a_name_that_is_not_utf8_is_sent_escaped() -> None:
    name = os.fsdecode(b"caf\xe9.toml")  # as os.listdir returns it
    frame = ErrorFrame(id=2, error=ErrorInfo(code="config_error", message="rejected",
                                             details=[f"{name}: file name: rename the file"]))
    line = frame_bytes(frame)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = json.loads(line.decode("utf-8"))  # valid UTF-8, valid JSON
    assert doc["error"]["details"] == ["caf\\xe9.toml: file name: rename the file"]
    assert isinstance(parse_frame(line), ErrorFrame)
    lone = ErrorFrame(id=3, error=ErrorInfo(code="x", message="a\ud800b"))  # no escaped byte
    assert json.loads(frame_bytes(lone))["error"]["message"] == "a\\ud800b"
