"""The control socket: binding it (or taking systemd's), accepting clients, and dispatching each
request line to `mi50d.control.handlers.HANDLERS`.

Every connection is a task in the server's own TaskGroup, which is one task of the daemon's; a
connection can only end itself: malformed lines get an error frame, an oversized line gets
`too_large` and the connection closed, a line not finished within `read_timeout_s` closes it, and a
client that does not read its replies within `write_timeout_s` is dropped. Tracebacks go to the log.

No client can break the listener: who may connect is decided per uid (`mi50d.control.admission`:
root and the daemon's own uid always get in), an `accept()` error is logged and survived (out of
file descriptors: waiting clients are told so, then the loop waits for a connection to end or
`ACCEPT_BACKOFF_S`), and a reply that cannot be encoded (a file name that is not UTF-8) is sent
with the offending bytes escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mi50d.config import ConfigError
from mi50d.control.admission import (
    CLIENT_GONE,
    OUT_OF_FDS,
    Admission,
    Spare,
    accept_error_name,
    refuse,
)
from mi50d.control.handlers import HANDLERS
from mi50d.control.protocol import (
    MAX_LINE,
    ErrorCode,
    ErrorFrame,
    ErrorInfo,
    EventFrame,
    ProtocolError,
    ResultFrame,
    encode,
    parse_request,
)
from mi50d.control.view import DaemonView
from mi50d.engine.supervisor import UnknownInstance

log = logging.getLogger("mi50d.control.server")

READ_TIMEOUT_S = 10.0  # idle or half-sent line
WRITE_TIMEOUT_S = 10.0  # a client not reading its replies
ACCEPT_BACKOFF_S = 1.0  # after an accept() error, unless a connection ends sooner
REFUSAL_LOG_S = 60.0  # one journal line per refused uid in this long, with the count since
SOCKET_MODE = 0o660


class ControlSocketError(Exception):
    """The control socket cannot be set up; one line with the cause and a fix."""


class _PeerGone(Exception):
    """The client left or stopped reading; the connection ends quietly."""


# ---- the listening socket ------------------------------------------------------------------------


def bind_socket(path: Path, group: str) -> socket.socket:
    """A listening socket at `path`, mode 0660, group `group` when it exists.

    It is bound under a temporary name and renamed into place, so it never exists at `path` with
    the wrong mode. A stale socket file (nobody accepting) is replaced; a live one is an error.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        direct = len(os.fsencode(tmp)) >= 108  # no room for the temporary name: bind in place
        where = path if direct else tmp
        where.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fsencode(where))
            os.chmod(where, SOCKET_MODE)
            _set_group(where, group, path)
            if not direct:
                os.rename(tmp, path)
            sock.listen(128)
        except BaseException:
            sock.close()
            where.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ControlSocketError(f"cannot create the control socket {path}: {exc.strerror}; "
                                 "check the directory and --socket") from None
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; remove it or choose "
                                 "another path with --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsencode(path))
        except OSError:
            log.info("stale_socket_removed path=%s", path)
            path.unlink(missing_ok=True)
            return
    raise ControlSocketError(f"another mi50d is already listening on {path}; stop it first "
                             "(systemctl stop mi50d) or choose another path with --socket")


def _set_group(where: Path, group: str, path: Path) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("socket_group_missing group=%s path=%s: keeping the daemon's group; create "
                    "it (groupadd --system %s) or set socket_group in mi50d.toml",
                    group, path, group)
        return
    try:
        os.chown(where, -1, gid)
    except PermissionError:
        log.warning("socket_group_not_set group=%s path=%s: not permitted", group, path)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED), or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


# ---- serving -------------------------------------------------------------------------------------


class ControlServer:
    def __init__(self, daemon: DaemonView, sock: socket.socket, path: Path, *, activated: bool,
                 read_timeout_s: float = READ_TIMEOUT_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S,
                 admission: Admission | None = None) -> None:
        self.daemon = daemon
        self.sock = sock
        self.path = path
        self.activated = activated  # systemd's socket: never unlinked by us
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.admission = admission or Admission()
        self._spare = Spare()
        self._ended = asyncio.Event()  # a connection ended: a descriptor may be free again
        self._starved = False  # in an episode of accept errors (logged once per episode)
        self._refusals: dict[int | None, tuple[float, int]] = {}  # uid: (logged at, since)

    async def serve(self) -> None:
        """Accept clients until cancelled; cancelling ends every connection too. Nothing a
        client does, and no accept() error, ends this loop."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self.sock)
                except OSError as exc:
                    await self._accept_failed(exc)
                    continue
                if self._starved:
                    log.info("control_accept_recovered clients=%d", self.admission.total)
                    self._starved = False
                peer = peer_credentials(conn)
                uid = peer[1] if peer else None
                refusal = self.admission.refusal(uid)
                if refusal is not None:
                    self._log_refusal(uid, peer, refusal)
                    refuse(conn, ErrorCode.TOO_MANY_CLIENTS, refusal)
                    continue
                self.admission.admit(uid)
                tg.create_task(self._connection(conn, peer, uid))

    def close(self) -> None:
        """Stop listening; remove the socket file unless systemd owns it."""
        self.sock.close()
        self._spare.close()
        if not self.activated:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _accept_failed(self, exc: OSError) -> None:
        """Log an accept() error and decide how soon to accept again; never raise."""
        name = accept_error_name(exc)
        if exc.errno in CLIENT_GONE:
            log.info("control_accept_failed errno=%s (the client left first)", name)
            return
        if not self._starved:
            log.warning("control_accept_failed errno=%s clients=%d: %s; new clients are refused "
                        "until connections end", name, self.admission.total,
                        exc.strerror or exc)
            self._starved = True
        if exc.errno in OUT_OF_FDS:
            told = self._spare.shed(self.sock)
            if told:
                log.info("control_clients_shed count=%d reason=%s", told, name)
                return  # each was a waiting client: the backlog moved, no need to wait
        # Wait for a connection to end (a descriptor is free again), at most the backoff: the
        # shortage may be elsewhere in the daemon, and nothing else would wake us.
        self._ended.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACCEPT_BACKOFF_S):
                await self._ended.wait()

    def _log_refusal(self, uid: int | None, peer: tuple[int, int, int] | None,
                     refusal: str) -> None:
        """At most once per uid in REFUSAL_LOG_S: a client retrying in a loop must not flood
        the journal (thousands of refusals a second are cheap to send, not to keep)."""
        now = time.monotonic()
        logged, since = self._refusals.get(uid, (-REFUSAL_LOG_S, 0))
        if now - logged < REFUSAL_LOG_S:
            self._refusals[uid] = (logged, since + 1)
            return
        self._refusals[uid] = (now, 0)
        log.warning("client_refused reason=too_many_clients peer_uid=%s peer_pid=%s "
                    "refused_since_last=%d: %s", uid, peer[0] if peer else None, since, refusal)

    async def _connection(self, conn: socket.socket, peer: tuple[int, int, int] | None,
                          uid: int | None) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
            except OSError:
                conn.close()
                return
            try:
                while await self._one_request(reader, writer, peer):
                    pass
            except _PeerGone:
                pass
            except Exception:  # a bug here must end one connection, not the daemon
                log.exception("control_connection_failed peer=%s", peer)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        finally:
            self.admission.release(uid)
            self._ended.set()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           peer: tuple[int, int, int] | None) -> bool:
        """Read and answer one request; False when the connection should end."""
        try:
            async with asyncio.timeout(self.read_timeout_s):
                line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.info("control_request_truncated bytes=%d peer=%s", len(exc.partial), peer)
            return False
        except asyncio.LimitOverrunError:
            await self._send(writer, ErrorFrame(id=None, error=ErrorInfo(
                code=ErrorCode.TOO_LARGE, message=f"request line over {MAX_LINE} bytes")))
            return False
        except TimeoutError:
            log.info("control_connection_idle timeout_s=%g peer=%s", self.read_timeout_s, peer)
            return False
        except ConnectionError:
            return False
        if not line.strip():
            return True
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            await self._send(writer, ErrorFrame(id=exc.request_id, error=ErrorInfo(
                code=exc.code, message=exc.message)))
            return True
        command = HANDLERS[request.command]
        if command.mutates:
            pid, uid = (peer[0], peer[1]) if peer else (None, None)
            log.info("control_command command=%s args=%s peer_uid=%s peer_pid=%s",
                     request.command, request.args.model_dump_json(), uid, pid)

        async def emit(event: BaseModel) -> None:
            await self._send(writer, EventFrame(id=request.id, event=event.model_dump(mode="json")))

        run = command.run(self.daemon, request.args, emit)
        try:
            result = await (self._until_peer_leaves(run, reader) if command.streams else run)
        except UnknownInstance as exc:
            reply: BaseModel = ErrorFrame(id=request.id, error=ErrorInfo(
                code=ErrorCode.UNKNOWN_INSTANCE, message=str(exc)))
        except ConfigError as exc:
            reply = ErrorFrame(id=request.id, error=ErrorInfo(
                code=ErrorCode.CONFIG_ERROR, details=exc.problems,
                message=f"configuration rejected ({len(exc.problems)} problem(s)); "
                        "running set kept"))
        except ProtocolError as exc:  # a handler's refusal with its own code (busy, ...)
            reply = ErrorFrame(id=request.id, error=ErrorInfo(
                code=exc.code, message=exc.message, details=exc.details))
        except _PeerGone:
            raise
        except Exception:
            log.exception("control_command_failed command=%s", request.command)
            reply = ErrorFrame(id=request.id, error=ErrorInfo(
                code=ErrorCode.INTERNAL, message="internal error in mi50d; see its journal"))
        else:
            reply = ResultFrame(id=request.id, result=result.model_dump(mode="json"))
        await self._send(writer, reply)
        return True

    async def _until_peer_leaves(self, run: Coroutine[Any, Any, BaseModel],
                                 reader: asyncio.StreamReader) -> BaseModel:
        """Run a streaming handler; cancel it if the client closes its end meanwhile. Anything
        the client sends during a stream is discarded."""
        handler = asyncio.ensure_future(run)
        watcher = asyncio.ensure_future(_eof(reader))
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                raise _PeerGone
            return handler.result()
        finally:
            for task in (handler, watcher):
                task.cancel()
            await asyncio.gather(handler, watcher, return_exceptions=True)

    async def _send(self, writer: asyncio.StreamWriter, frame: BaseModel) -> None:
        try:
            writer.write(frame_bytes(frame))
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            log.warning("control_client_dropped reason=not_reading timeout_s=%g",
                        self.write_timeout_s)
            raise _PeerGone from None
        except (ConnectionError, RuntimeError):
            raise _PeerGone from None


def frame_bytes(frame: BaseModel) -> bytes:
    """`encode(frame)`, or, when a string in it is not valid Unicode (a non-UTF-8 file name read
    with surrogateescape), the same frame with each such byte written as `\\xNN`."""
    try:
        return encode(frame)
    except ValueError:  # pydantic's serialization error for a lone surrogate
        data = _printable(frame.model_dump(mode="json"))
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte
            raw = value.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


async def _eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def socket_path_of(sock: socket.socket) -> Path | None:
    """The filesystem path a Unix socket is bound to (None for abstract or unnamed)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="surrogateescape")
    return Path(name) if name and not name.startswith("\0") else None

