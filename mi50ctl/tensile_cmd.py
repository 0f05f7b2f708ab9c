"""`mi50ctl tensile install|uninstall|status`: rocBLAS's gfx906 Tensile files in a ROCm tree (see
`mi50d.host.tensile`). Only option parsing and rendering live here; the logic is imported inside
the commands so that other mi50ctl commands stay fast to start.

Exit status: 0 done, 1 refused or failed (the message says why and what to do).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from mi50d.host.rocm import Rocm

DEFAULT_CONFIG_DIR = "/etc/mi50d"

rocm_path_option = click.option(
    "--rocm-path", type=click.Path(file_okay=False, path_type=Path),
    help="The ROCm tree to change. Default: host.rocm_path in mi50d.toml (/opt/rocm), else a "
         "distribution's ROCm in /usr.")
config_dir_option = click.option(
    "--config-dir", type=click.Path(path_type=Path), envvar="MI50D_CONFIG_DIR",
    default=DEFAULT_CONFIG_DIR, show_default=True, help="mi50d's configuration directory.")


def _locate(rocm_path: Path | None, config_dir: Path) -> tuple[Rocm, Path]:
    from mi50d.config import ConfigError, load_daemon_config
    from mi50d.host import tensile

    if rocm_path is None:
        try:
            rocm_path = load_daemon_config(config_dir).host.rocm_path
        except ConfigError as exc:
            raise click.ClickException("\n".join(exc.problems)) from None
    try:
        return tensile.locate(rocm_path.absolute(), os.environ)
    except tensile.TensileError as exc:
        raise click.ClickException(str(exc)) from None


def _doctor_line(found: Rocm) -> str:
    """The rocblas check of `mi50ctl doctor`, on the tree just changed."""
    from mi50d.config import DaemonConfig
    from mi50d.host.preflight import rocblas_check

    env = {k: v for k, v in os.environ.items() if k != "ROCBLAS_TENSILE_LIBPATH"}
    check = rocblas_check(DaemonConfig.model_validate({"host": {"rocm_path": found.prefix}}), env)
    mark = {"ok": "✓", "fail": "✗"}.get(check.status, "!")
    return f"{mark} {check.line()}"


@click.group()
def tensile() -> None:
    """rocBLAS's gfx906 Tensile files: AMD's ROCm >= 6.4 ships none, so install them from a
    rocBLAS package built for gfx906 (e.g. Debian's librocblas5 .deb)."""


@tensile.command()
@click.argument("source", metavar="PACKAGE_OR_DIR",
                type=click.Path(exists=True, path_type=Path))
@rocm_path_option
@config_dir_option
def install(source: Path, rocm_path: Path | None, config_dir: Path) -> None:
    """Copy only the *gfx906* Tensile files of PACKAGE_OR_DIR (.deb, .tar.*, or a directory)
    into the tree's rocBLAS library, with a manifest for `uninstall`. Never overwrites a file it
    did not install; on any error nothing is changed."""
    from mi50d.host import tensile as logic

    found, library = _locate(rocm_path, config_dir)
    click.echo(f"reading {source} ...")
    try:
        done = logic.install(source.absolute(), library)
    except logic.TensileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"installed {len(done.files)} gfx906 files from {done.source.describe()} "
               f"into {library}")
    warning = logic.version_mismatch(found, done.source.version)
    if warning:
        click.echo(f"warning: {warning}")
    override = os.environ.get("ROCBLAS_TENSILE_LIBPATH")
    if override and Path(override) != library:
        click.echo(f"warning: ROCBLAS_TENSILE_LIBPATH={override} is set here: rocBLAS reads "
                   "only that directory where it is set")
    click.echo(_doctor_line(found))


@tensile.command()
@rocm_path_option
@config_dir_option
def uninstall(rocm_path: Path | None, config_dir: Path) -> None:
    """Remove the files `install` put into the tree (those unchanged since), and its manifest."""
    from mi50d.host import tensile as logic

    found, library = _locate(rocm_path, config_dir)
    try:
        done = logic.uninstall(library)
    except logic.TensileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {len(done.removed)} files from {library}")
    for name in done.kept:
        click.echo(f"kept {name}: changed since mi50d installed it")
    click.echo(_doctor_line(found))


@tensile.command()
@rocm_path_option
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def status(rocm_path: Path | None, config_dir: Path, as_json: bool) -> None:
    """Where rocBLAS's library is, how many gfx906 files it has and which mi50d installed."""
    from mi50d.host import tensile as logic

    found, library = _locate(rocm_path, config_dir)
    try:
        state = logic.status(library)
    except logic.TensileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"rocm": found.describe(), **state}, indent=2))
        return
    lines = [found.describe(), f"rocBLAS library: {library}"
             + ("" if state["exists"] else " (does not exist)"),
             f"gfx906 files: {state['files']}"]
    if state["installed_by_mi50d"]:
        origin = " ".join(str(p) for p in (state["package"] or state["source"],
                                           state["package_version"]) if p)
        lines.append(f"installed by mi50d: {state['installed_by_mi50d']} from {origin} on "
                     f"{state['installed_at']}")
        for key in ("missing", "changed"):
            if state[key]:
                lines.append(f"{key}: {', '.join(state[key])}")
    else:
        lines.append("installed by mi50d: none")
    click.echo("\n".join(lines))
