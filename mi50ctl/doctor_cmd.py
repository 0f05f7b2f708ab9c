"""`mi50ctl doctor` and `mi50ctl check NAME`: the host and instance checks, answered for the account
mi50d's instances run as.

They ask the running mi50d first (`doctor` and `check` on its socket), which checks as that
account; when it cannot answer (not running, an older version, another configuration
directory, refused) they check here: as the service account when run as root, else as the caller,
and then say so, since file and device access may differ. Only option parsing and rendering live
here; the checks are imported inside the commands so that other mi50ctl commands start fast.

Exit status: 0 when every check is ok or a warning, 1 when any failed, 4 for an unknown
instance, 78 when the configuration does not load; the socket's failures as in `mi50ctl.errors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from mi50ctl.client import Client, ClientError, RemoteError, ReplyTimeout
from mi50ctl.ctl_cmd import check_name, pass_client
from mi50ctl.errors import ConfigRejected, Failed, UnknownName, translate
from mi50d.control.protocol import CheckedAs, CheckInfo, CheckResult, DoctorResult

if TYPE_CHECKING:
    from mi50d.host.checks import Check

DEFAULT_CONFIG_DIR = "/etc/mi50d"
SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}

config_dir_option = click.option(
    "--config-dir", type=click.Path(path_type=Path), envvar="MI50D_CONFIG_DIR",
    default=DEFAULT_CONFIG_DIR, show_default=True, help="mi50d's configuration directory.")
json_option = click.option("--json", "as_json", is_flag=True, help="All checks as JSON.")
local_option = click.option(
    "--local", is_flag=True,
    help="Check here without asking mi50d (as the service account only when run as root).")


def render(title: str, checks: Sequence[Check]) -> list[str]:
    """One aligned line per check: symbol, name, message, and the fix after an arrow."""
    width = max((len(c.name) for c in checks), default=0)
    lines = [title]
    for c in checks:
        fix = f"  → {c.fix}" if c.fix and c.status in ("warn", "fail") else ""
        lines.append(f"  {SYMBOLS[c.status]} {c.name:<{width}}  {c.message}{fix}")
    return lines


def _checks(infos: Sequence[CheckInfo]) -> list[Check]:
    from mi50d.host.checks import Check

    return [Check(i.name, i.status, i.message, i.fix, i.data) for i in infos]


def _explicit(name: str) -> bool:
    """Whether the option `name` was given (or set in the environment), not left at its default."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT)


def _ask(client: Client, command: str, args: dict[str, Any],
         config_dir: Path) -> tuple[Any, str]:
    """mi50d's result, or None and why it cannot answer for `config_dir` (only when one was
    given: by default the daemon's own directory is the one to check)."""
    try:
        result = client.call(command, args)
    except RemoteError as exc:
        if exc.code == "unknown_instance":
            raise UnknownName(exc.message) from None
        if exc.code in ("unknown_command", "busy", "too_many_clients"):
            return None, f"mi50d cannot check: {exc.message}"
        raise translate(exc) from None
    except ReplyTimeout as exc:
        raise translate(exc) from None
    except ClientError as exc:
        return None, translate(exc).format_message()
    theirs = CheckedAs.model_validate(result["checked_as"])
    if _explicit("config_dir") and (os.path.realpath(theirs.config_dir)
                                    != os.path.realpath(config_dir)):
        return None, f"mi50d reads {theirs.config_dir}, not {config_dir}"
    return result, ""


def _by_daemon(checked: CheckedAs) -> dict[str, Any]:
    return {"where": "mi50d", "pid": checked.pid, "account": checked.account, "note": None}


def _here(config_dir: Path, why: str, again: str) -> dict[str, Any]:
    """Who a local check answers for, and a note when that is not the service account."""
    from mi50d.config import ConfigError, load_daemon_config
    from mi50d.host.access import account_name

    me = account_name(None)
    try:
        service = load_daemon_config(config_dir).user
    except ConfigError:
        service = "the configured user"
    note = None
    if os.geteuid() == 0:
        account = service  # the access checks switch to it
    else:
        account = me
        if me != service:
            note = (f"checked here as {me} (uid {os.getuid()}), not as the service account "
                    f"{service}: file and device access may differ ({why}); for the service "
                    f"account's view: sudo {again}, or start mi50d")
    return {"where": "here", "pid": os.getpid(), "account": account, "note": note}


def _footer(who: dict[str, Any]) -> str:
    if who["where"] == "mi50d":
        return f"(checked by mi50d, pid {who['pid']}, as {who['account']})"
    return f"(checked here as {who['account']})"


def _note(who: dict[str, Any], as_json: bool) -> None:
    if who["note"] and not as_json:
        click.echo(f"mi50ctl: note: {who['note']}", err=True)


@click.command()
@json_option
@config_dir_option
@local_option
@pass_client
def doctor(client: Client, as_json: bool, config_dir: Path, local: bool) -> None:
    """Check the host (ROCm, GPUs, access, rocBLAS, llama-server build, daemon) and every
    instance, as the account instances run as, and say how to fix what is wrong."""
    result, why = (None, "--local") if local else _ask(client, "doctor", {}, config_dir)
    if result is not None:
        remote = DoctorResult.model_validate(result)
        who = _by_daemon(remote.checked_as)
        host, instances = _checks(remote.host), {n: _checks(c) for n, c in
                                                  remote.instances.items()}
    else:
        from mi50d.host.doctor import run_doctor

        who = _here(config_dir, why, "mi50ctl doctor")
        _note(who, as_json)
        try:
            report = run_doctor(config_dir, Path(client.path))
        except Exception as exc:  # never a traceback; the daemon's log is not involved here
            raise Failed(f"doctor failed: {type(exc).__name__}: {exc}; mi50d --check-config "
                         f"--config-dir {config_dir} may name the problem") from None
        host, instances = report.host, report.instances
    failed = any(c.failed for c in [*host, *(c for cs in instances.values() for c in cs)])
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checked_by": who,
                               "host": [c.to_json() for c in host],
                               "instances": {n: [c.to_json() for c in cs]
                                             for n, cs in instances.items()}}, indent=2))
    else:
        lines = render("Host", host)
        for name, checks in instances.items():
            lines += ["", *render(f"Instance {name}", checks)]
        click.echo("\n".join([*lines, "", _footer(who)]))
    if failed:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("name", callback=check_name)
@json_option
@config_dir_option
@local_option
@pass_client
def check(client: Client, name: str, as_json: bool, config_dir: Path, local: bool) -> None:
    """Run instance NAME's preflight checks, as mi50d does before starting it (as the account
    it runs as)."""
    result, why = (None, "--local") if local else _ask(client, "check", {"name": name},
                                                         config_dir)
    if result is not None:
        remote = CheckResult.model_validate(result)
        if remote.problems:
            raise ConfigRejected("\n".join(remote.problems))
        who, checks = _by_daemon(remote.checked_as), _checks(remote.checks)
    else:
        who = _here(config_dir, why, f"mi50ctl check {name}")
        _note(who, as_json)
        checks = _local_check(client, config_dir, name)
    if as_json:
        click.echo(json.dumps({"instance": name, "ok": not any(c.failed for c in checks),
                               "checked_by": who, "checks": [c.to_json() for c in checks]},
                              indent=2))
    else:
        click.echo("\n".join([*render(f"Instance {name}", checks), "", _footer(who)]))
    if any(c.failed for c in checks):
        raise click.exceptions.Exit(1)


def _local_check(client: Client, config_dir: Path, name: str) -> list[Check]:
    from mi50d.config import ConfigError
    from mi50d.host.doctor import UnknownInstance, check_instance

    try:
        return check_instance(config_dir, name, Path(client.path))
    except ConfigError as exc:
        raise ConfigRejected("\n".join(exc.problems)) from None
    except UnknownInstance as exc:
        raise UnknownName(str(exc)) from None
    except Exception as exc:  # never a traceback
        raise Failed(f"checking {name} failed: {type(exc).__name__}: {exc}; mi50d "
                     f"--check-config --config-dir {config_dir} may name the problem") from None
