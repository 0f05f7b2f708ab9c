"""`mi50ctl doctor` and `mi50ctl check NAME`: local checks of the host and the instances, run
without the daemon (see `mi50d.host.doctor`). Only option parsing and rendering live here; the checks
are imported inside the commands so that other mi50ctl commands stay fast to start.

Exit status: 0 when every check is ok or a warning, 1 when any failed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from mi50d.host.checks import Check

DEFAULT_CONFIG_DIR = "/etc/mi50d"
SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}

config_dir_option = click.option(
    "--config-dir", type=click.Path(path_type=Path), envvar="MI50D_CONFIG_DIR",
    default=DEFAULT_CONFIG_DIR, show_default=True, help="mi50d's configuration directory.")
json_option = click.option("--json", "as_json", is_flag=True, help="All checks as JSON.")


def render(title: str, checks: Sequence[Check]) -> list[str]:
    """One aligned line per check: symbol, name, message, and the fix after an arrow."""
    width = max((len(c.name) for c in checks), default=0)
    lines = [title]
    for c in checks:
        fix = f"  → {c.fix}" if c.fix and c.status in ("warn", "fail") else ""
        lines.append(f"  {SYMBOLS[c.status]} {c.name:<{width}}  {c.message}{fix}")
    return lines


@click.command()
@json_option
@config_dir_option
def doctor(as_json: bool, config_dir: Path) -> None:
    """Check the host (ROCm, GPUs, access, rocBLAS, llama-server build, daemon) and every
    instance, and say how to fix what is wrong."""
    from mi50d.host.doctor import run_doctor

    report = run_doctor(config_dir)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        lines = render("Host", report.host)
        for name, checks in report.instances.items():
            lines += ["", *render(f"Instance {name}", checks)]
        click.echo("\n".join(lines))
    if report.failed:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("name")
@json_option
@config_dir_option
def check(name: str, as_json: bool, config_dir: Path) -> None:
    """Run instance NAME's preflight checks, as mi50d does before starting it."""
    from mi50d.config import ConfigError
    from mi50d.host.doctor import UnknownInstance, check_instance

    try:
        checks = check_instance(config_dir, name)
    except ConfigError as exc:
        raise click.ClickException("\n".join(exc.problems)) from None
    except UnknownInstance as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"instance": name, "ok": not any(c.failed for c in checks),
                               "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        click.echo("\n".join(render(f"Instance {name}", checks)))
    if any(c.failed for c in checks):
        raise click.exceptions.Exit(1)
