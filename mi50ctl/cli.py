"""mi50ctl's command line: the click group. The only place (with the *_cmd modules) that renders
errors and chooses exit codes. Keep imports cheap: heavy modules are imported inside commands."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Control mi50d, the llama-server supervisor for AMD MI50 GPUs."""


# Commands are registered below, one module per area.
from mi50ctl.build_cmd import build_llama  # noqa: E402

cli.add_command(build_llama)


def main() -> None:
    cli()
