#!/usr/bin/env python3
"""A small scriptable stand-in for llama-server, for fault injection only (beside the real one).

It takes llama-server's command line (only --host and --port matter) and behaves as the FAKE_*
environment variables say, which tests set through an instance's `env` table:

FAKE_LOAD_S        seconds of answering 503 "Loading model" before 200 (default 0)
FAKE_FAIL_LOAD     print this line and exit 1 at the end of loading
FAKE_EXIT_AFTER_S  seconds after ready to exit with FAKE_EXIT_CODE (default 1)
FAKE_HANG_AFTER_S  seconds after ready to stop answering (connections accepted, never answered)
FAKE_IGNORE_TERM   "1": ignore SIGTERM
FAKE_GRANDCHILD    "1": fork a child first that ignores SIGTERM, keeps the listening socket and
                   outlives this process (it prints "fake llama-server: grandchild pid N")
FAKE_HUGE_STATUS   once ready, answer with a status line this many bytes long (no newline soon)
FAKE_STALL_AFTER_S seconds after ready to answer "200 OK" headers and then never the body
FAKE_JUNK_BYTES    print this many bytes without a newline first (then a newline)
FAKE_PRINT_LINES   print this many numbered lines of 1000 bytes first
FAKE_SET_COOKIE    once ready, every answer sets this cookie and its body says which Cookie
                   header the request carried ({"status":"ok","cookie":"..."})
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time


def _arg(flag: str, default: str) -> str:
    argv = sys.argv
    return argv[argv.index(flag) + 1] if flag in argv else default


def _answer(conn: socket.socket, status: str, body: str, cookie: str | None = None) -> None:
    extra = "" if cookie is None else \
        f"Set-Cookie: {cookie}\r\nContent-Type: application/json\r\n"
    try:
        request = conn.recv(65536).decode("latin-1")
        if cookie is not None:
            sent = [line.split(":", 1)[1].strip() for line in request.split("\r\n")
                    if line.lower().startswith("cookie:")]
            body = '{"status":"ok","cookie":"%s"}' % (sent[0] if sent else "")
        data = body.encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n{extra}"
                "Connection: close\r\n\r\n")
        conn.sendall(head.encode() + data)
    except OSError:
        pass
    finally:
        conn.close()


def _grandchild() -> None:
    """Fork a process of our group that ignores SIGTERM and lives on (holding our port)."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            signal.pause()
    print(f"fake llama-server: grandchild pid {pid}", flush=True)


def _stall(conn: socket.socket, held: list[socket.socket]) -> None:
    """Headers of a 200 with a body that never comes."""
    try:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n")
    except OSError:
        pass
    held.append(conn)


def main() -> None:
    env = os.environ
    if env.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "FAKE_JUNK_BYTES" in env:
        sys.stdout.write("j" * int(env["FAKE_JUNK_BYTES"]) + "\n")
        sys.stdout.flush()
    for number in range(int(env.get("FAKE_PRINT_LINES", "0"))):
        sys.stdout.write(f"line {number:06d} " + "x" * 988 + "\n")
    sys.stdout.flush()
    host, port = _arg("--host", "127.0.0.1"), int(_arg("--port", "8080"))
    srv = socket.create_server((host, port))
    if env.get("FAKE_GRANDCHILD") == "1":
        _grandchild()
    start = time.monotonic()
    load_s = float(env.get("FAKE_LOAD_S", "0"))
    print(f"fake llama-server: listening on {host}:{port}, loading for {load_s}s", flush=True)
    ready_at: list[float] = []
    hung = threading.Event()

    def timers() -> None:
        time.sleep(load_s)
        if env.get("FAKE_FAIL_LOAD"):
            print(env["FAKE_FAIL_LOAD"], flush=True)
            os._exit(1)
        ready_at.append(time.monotonic())
        print("fake llama-server: model loaded", flush=True)
        if "FAKE_HANG_AFTER_S" in env:
            time.sleep(float(env["FAKE_HANG_AFTER_S"]))
            print("fake llama-server: hanging now", flush=True)
            hung.set()
        if "FAKE_EXIT_AFTER_S" in env:
            time.sleep(float(env["FAKE_EXIT_AFTER_S"]))
            code = int(env.get("FAKE_EXIT_CODE", "1"))
            print(f"fake llama-server: exiting with {code}", flush=True)
            os._exit(code)

    threading.Thread(target=timers, daemon=True).start()
    held: list[socket.socket] = []
    while True:
        conn, _ = srv.accept()
        if hung.is_set():
            held.append(conn)  # never answered, like a wedged server
            continue
        stall_s = env.get("FAKE_STALL_AFTER_S")
        if ready_at and stall_s is not None and time.monotonic() - ready_at[0] >= float(stall_s):
            _stall(conn, held)
        elif ready_at and "FAKE_HUGE_STATUS" in env:
            _answer(conn, "200 " + "x" * int(env["FAKE_HUGE_STATUS"]), "")
        elif ready_at:
            _answer(conn, "200 OK", '{"status":"ok"}', env.get("FAKE_SET_COOKIE"))
        else:
            elapsed = time.monotonic() - start
            _answer(conn, "503 Service Unavailable",
                    '{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}'
                    f',"elapsed":{elapsed:.2f}}}')


if __name__ == "__main__":
    main()
