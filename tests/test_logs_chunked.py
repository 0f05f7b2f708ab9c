"""`logs` without follow sends a large backlog as bounded chunks when asked (`chunked`, which
mi50ctl asks for), the same lines as the one-frame form that older clients get."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from mi50d.control.handlers import CHUNK_BYTES
from tests.ctlsupport import fake_instance, first_frame, running_daemon, wait_until
from tests.support import free_port

LINES = 1500  # 1000-byte lines: about 1.5 MB, several chunks


def _frames(path: Path, args: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Every frame of one `logs` request, with its size on the wire, up to its result."""
    request = {"v": 1, "id": 1, "command": "logs", "args": args}
    frames: list[tuple[int, dict[str, Any]]] = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        while not frames or "result" not in frames[-1][1]:
            frame = first_frame(sock)
            frames.append((len(json.dumps(frame)), frame))
            assert "error" not in frame, frame
    return frames


def test_logs_come_in_bounded_chunks() -> None:
    instance = fake_instance(free_port(), autostart=True, env={"FAKE_PRINT_LINES": str(LINES)})
    with running_daemon({"wait_ready": True}, {"a": instance}) as d:
        wait_until(lambda: len(d.ctl("logs", "a", "-n", "2000").stdout.splitlines()) >= LINES,
                   "the fake server's lines kept")
        whole = _frames(d.socket, {"name": "a", "n": 2000})
        assert len(whole) == 1
        expected = whole[0][1]["result"]["lines"]
        assert sum(line.startswith("line ") for line in expected) == LINES

        chunked = _frames(d.socket, {"name": "a", "n": 2000, "chunked": True})
        events = [frame["event"] for _, frame in chunked[:-1]]
        assert len(events) >= 5
        assert all(size < CHUNK_BYTES + 64 * 1024 for size, _ in chunked)
        assert chunked[-1][1]["result"] == {"name": "a", "lines": []}
        assert [line for event in events for line in event["lines"]] == expected

        printed = d.ctl("logs", "a", "-n", "2000")
        assert printed.returncode == 0
        assert printed.stdout.splitlines() == expected
