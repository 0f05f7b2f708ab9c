"""mi50ctl's command line: the click group. The only place (with the *_cmd modules) that renders
errors and chooses exit codes. Keep imports cheap: heavy modules are imported inside commands."""

from __future__ import annotations

import click

from mi50ctl.client import REPLY_TIMEOUT_S, Client
from mi50ctl.errors import EPILOG


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--socket", "socket_path", envvar="MI50D_SOCKET", metavar="PATH",
              help="mi50d's control socket (default: `socket` in /etc/mi50d/mi50d.toml, else "
                   "/run/mi50d/control.sock).")
@click.option("--reply-timeout", "reply_timeout_s", envvar="MI50CTL_REPLY_TIMEOUT",
              type=click.FloatRange(min=0, max=24 * 3600, min_open=True), metavar="SECONDS",
              default=REPLY_TIMEOUT_S, show_default=True,
              help="How long to wait for each reply of mi50d before giving up (exit 75).")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, reply_timeout_s: float) -> None:
    """Control mi50d, the llama-server supervisor for AMD MI50 GPUs."""
    ctx.obj = Client(socket_path, reply_timeout_s=reply_timeout_s)


# Commands are registered below, one module per area.
from mi50ctl.build_cmd import build_llama  # noqa: E402

cli.add_command(build_llama)

from mi50ctl.doctor_cmd import check, doctor  # noqa: E402

cli.add_command(doctor)
cli.add_command(check)

from mi50ctl.tensile_cmd import tensile  # noqa: E402

cli.add_command(tensile)

from mi50ctl.ctl_cmd import logs, reload, restart, start, status, stop  # noqa: E402

cli.add_command(status)
cli.add_command(start)
cli.add_command(stop)
cli.add_command(restart)
cli.add_command(reload)
cli.add_command(logs)


def main() -> None:
    cli()
