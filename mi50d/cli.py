"""mi50d's command line: the only place that parses argv, renders errors and exits.

Exit codes: 0 clean stop, 78 (EX_CONFIG) for a broken configuration, so systemd's
`RestartPreventExitStatus=78` does not loop on it; 73 (EX_CANTCREAT) when the control socket
cannot be created (another mi50d listens there, or the path is not usable).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import click

from mi50d import __version__
from mi50d.config import DEFAULT_CONFIG_DIR, Config, ConfigError, load_config
from mi50d.host.accounts import account_for
from mi50d.host.flashattn import with_host_defaults

EX_CONFIG = 78
EX_CANTCREAT = 73


def _setup_logging(level: str) -> None:
    # systemd's journal adds its own timestamps; a terminal wants them.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt)


def _resolved(config: Config) -> dict[str, object]:
    out: dict[str, object] = {"directory": str(config.directory),
                              "daemon": config.daemon.model_dump(mode="json"), "instances": {}}
    for name, inst in config.instances.items():
        env = inst.environment({}, config.daemon)
        assert isinstance(out["instances"], dict)
        out["instances"][name] = {
            "argv": inst.argv(config.daemon),
            "env": env,
            "autostart": inst.autostart,
            "source": str(inst.source),
        }
    return out


def _print_resolved(config: Config) -> None:
    click.echo(f"config: {config.directory} ({len(config.instances)} instances) ok")
    for name, inst in sorted(config.instances.items()):
        env = inst.environment({}, config.daemon)
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        cmd = shlex.join(inst.argv(config.daemon))
        click.echo(f"\n[{name}] autostart={str(inst.autostart).lower()} ({inst.source})")
        click.echo(f"  {prefix + ' ' if prefix else ''}{cmd}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config-dir", type=click.Path(path_type=Path), envvar="MI50D_CONFIG_DIR",
              default=DEFAULT_CONFIG_DIR, show_default=True, help="Directory of *.toml files.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="MI50D_SOCKET",
              default=None, help="Control socket path (default: `socket` in mi50d.toml).")
@click.option("--check-config", is_flag=True,
              help="Validate, print each instance's exact command line and environment, exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check-config: print JSON.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(__version__, prog_name="mi50d")
def main(config_dir: Path, socket_path: Path | None, check_config: bool, as_json: bool,
         log_level: str) -> None:
    """Supervise llama-server instances described by CONFIG_DIR/*.toml, in the foreground."""
    try:
        config = with_host_defaults(load_config(config_dir))  # flash_attn on for gfx906
        account = account_for(config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"mi50d: {problem}", err=True)
        click.echo(f"mi50d: configuration in {config_dir} rejected", err=True)
        sys.exit(EX_CONFIG)
    if check_config:
        if as_json:
            click.echo(json.dumps(_resolved(config), indent=2))
        else:
            _print_resolved(config)
        return
    _setup_logging(log_level)
    import uvloop

    from mi50d.control.server import ControlSocketError
    from mi50d.daemon import serve  # the event loop and everything under it
    from mi50d.gateway.service import ListenError

    try:
        uvloop.run(serve(config, account, socket_path or config.daemon.socket))
    except (ControlSocketError, ListenError) as exc:
        click.echo(f"mi50d: {exc}", err=True)
        sys.exit(EX_CANTCREAT)
    except ConfigError as exc:  # found once running, e.g. an unreadable gateway key file
        click.echo(f"mi50d: {exc}", err=True)
        sys.exit(EX_CONFIG)
