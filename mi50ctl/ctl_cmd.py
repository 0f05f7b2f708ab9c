"""`mi50ctl status|start|stop|restart|reload|logs`: the daemon's control commands.

Exit codes are listed in `mi50ctl.errors` (and `mi50ctl --help`); errors are ClickException
subclasses, rendered by click on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from mi50ctl import render
from mi50ctl.client import Client, RemoteError
from mi50ctl.errors import EX_NOT_RUNNING, client_errors
from mi50d.control.protocol import (
    MAX_NAME,
    MAX_TIMEOUT_S,
    ErrorCode,
    EventFrame,
    InstancesResult,
    LogsChunk,
    LogsResult,
    ReloadResult,
    ResultFrame,
    StartProgress,
    StartResult,
    StatusResult,
)

START_FRAME_TIMEOUT_S = 60.0  # the daemon sends start progress at least every second

pass_client = click.make_pass_decorator(Client)
_errors = client_errors

# Instance names and waits within the protocol's bounds: refused here as usage errors (exit 2),
# never as a traceback from the request's validation.
TIMEOUT_TYPE = click.FloatRange(min=0, max=MAX_TIMEOUT_S, min_open=True)


def check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not 1 <= len(value) <= MAX_NAME:
        raise click.BadParameter(f"an instance name has 1 to {MAX_NAME} characters, not "
                                 f"{len(value)}")
    return value


class StartFailed(click.ClickException):
    exit_code = 1


def _target(name: str | None, all_: bool) -> dict[str, Any]:
    if bool(name) == all_:
        raise click.UsageError("give an instance NAME or --all (not both)")
    return {"name": name} if name else {}


@click.command()
@click.argument("name", required=False, callback=check_name)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@pass_client
@click.pass_context
def status(ctx: click.Context, client: Client, name: str | None, as_json: bool) -> None:
    """Show instances. Exit 0 when NAME (or every autostart instance) is running, else 3."""
    with _errors():
        result = StatusResult.model_validate(client.call("status", {"name": name} if name else {}))
    if as_json:
        click.echo(render.as_json(result.model_dump(mode="json")))
    else:
        click.echo(render.status_text(result, with_daemon=name is None))
    watched = [st for st in result.instances if name or st.autostart]
    if any(st.state != "running" for st in watched):
        ctx.exit(EX_NOT_RUNNING)


def _follow_start(client: Client, name: str, wait: bool, timeout_s: float | None) -> None:
    args: dict[str, Any] = {"name": name, "wait": wait}
    if timeout_s is not None:
        args["timeout_s"] = timeout_s
    progress = render.Progress(sys.stdout, sys.stdout.isatty())
    result: StartResult | None = None
    with _errors():
        try:
            for frame in client.stream("start", args,
                                      timeout_s=min(START_FRAME_TIMEOUT_S, client.reply_timeout_s)):
                if isinstance(frame, EventFrame):
                    progress.update(StartProgress.model_validate(frame.event))
                else:
                    result = StartResult.model_validate(frame.result)
        finally:
            progress.close()
    assert result is not None
    st = result.status
    if result.outcome == "running":
        click.echo(render.started_text(st, result.elapsed_s))
    elif result.outcome == "requested":
        click.echo(f"{name}: start requested; now {st.state}")
    elif result.outcome == "timeout":
        raise StartFailed(f"{name} is still {st.state} after {render.duration(result.elapsed_s)}"
                          f" (it keeps starting; follow it: mi50ctl logs -f {name})")
    elif result.superseded:
        raise StartFailed(f"{name}: start {result.superseded}; now {st.state}")
    else:
        raise StartFailed(render.failure_text(st))


@click.command()
@click.argument("name", callback=check_name)
@click.option("--no-wait", is_flag=True, help="Return once the start is requested.")
@click.option("--timeout", "timeout_s", type=TIMEOUT_TYPE,
              metavar="SECONDS", help="Stop waiting after this long (it keeps starting).")
@pass_client
def start(client: Client, name: str, no_wait: bool, timeout_s: float | None) -> None:
    """Start NAME and wait until it answers, showing progress; print its endpoint."""
    _follow_start(client, name, not no_wait, timeout_s)


@click.command()
@click.argument("name", required=False, callback=check_name)
@click.option("--all", "all_", is_flag=True, help="Every instance.")
@pass_client
def stop(client: Client, name: str | None, all_: bool) -> None:
    """Stop NAME (or --all) and wait until its process is gone."""
    args = _target(name, all_)
    with _errors():
        result = InstancesResult.model_validate(client.call("stop", args))
    click.echo(render.instances_text("stopped", result.instances))


@click.command()
@click.argument("name", required=False, callback=check_name)
@click.option("--all", "all_", is_flag=True, help="Every instance.")
@click.option("--no-wait", is_flag=True, help="Return once the start is requested.")
@click.option("--timeout", "timeout_s", type=TIMEOUT_TYPE,
              metavar="SECONDS", help="Stop waiting after this long (it keeps starting).")
@pass_client
def restart(client: Client, name: str | None, all_: bool, no_wait: bool,
            timeout_s: float | None) -> None:
    """Stop and start NAME (or --all); wait until each answers again."""
    args = _target(name, all_)
    with _errors():
        result = InstancesResult.model_validate(client.call("restart", args))
    if no_wait:
        click.echo(render.instances_text("restarted", result.instances))
        return
    failed = []
    for st in result.instances:
        try:
            _follow_start(client, st.name, True, timeout_s)
        except StartFailed as exc:
            if name:
                raise
            click.echo(exc.format_message(), err=True)
            failed.append(st.name)
    if failed:
        raise StartFailed(f"not running after restart: {', '.join(failed)}")


@click.command()
@pass_client
def reload(client: Client) -> None:
    """Re-read the configuration; restart only instances whose file changed (same as SIGHUP)."""
    with _errors():
        result = ReloadResult.model_validate(client.call("reload"))
    click.echo(render.reload_text(result))


@click.command()
@click.argument("name", callback=check_name)
@click.option("-n", "lines", type=click.IntRange(0, 100_000), default=50, show_default=True,
              help="How many of the last lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@pass_client
def logs(client: Client, name: str, lines: int, follow: bool) -> None:
    """Print NAME's recent output (kept in mi50d's memory; the journal has everything)."""
    args = {"name": name, "n": lines, "follow": follow}
    with _errors():
        if not follow:
            _print_logs(client, args)
            return
        with contextlib.suppress(KeyboardInterrupt):
            for frame in client.stream("logs", args, timeout_s=None):
                if isinstance(frame, EventFrame):
                    chunk = LogsChunk.model_validate(frame.event)
                    if chunk.dropped:
                        click.echo(f"[mi50ctl: {chunk.dropped} events lost; reading too slowly]",
                                   err=True)
                    for line in chunk.lines:
                        click.echo(line)
                    sys.stdout.flush()



def _print_logs(client: Client, args: dict[str, Any]) -> None:
    """The last lines, in bounded chunks; from an mi50d older than `chunked` (running on after an
    upgrade of the package), in its one frame. Its refusal comes before any line is printed."""
    try:
        _echo_logs(client.stream("logs", {**args, "chunked": True}, client.reply_timeout_s))
    except RemoteError as exc:
        if exc.code != ErrorCode.BAD_REQUEST or "chunked" not in exc.message:
            raise
        _echo_logs(client.stream("logs", args, client.reply_timeout_s))


def _echo_logs(frames: Iterator[EventFrame | ResultFrame]) -> None:
    for frame in frames:
        if isinstance(frame, EventFrame):
            lines = LogsChunk.model_validate(frame.event).lines
        else:
            lines = LogsResult.model_validate(frame.result).lines
        for line in lines:
            click.echo(line)
