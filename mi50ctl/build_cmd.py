"""`mi50ctl build-llama`: build llama-server from a llama.cpp source tree (see `mi50d.llama.build`).

Only option parsing and rendering live here; `mi50d.llama.build` is imported inside the command so that
other mi50ctl commands do not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

CONFIG_HINT = "/etc/mi50d/mi50d.toml"


class BuildFailed(click.ClickException):
    """A build that could not start or did not finish; rendered as one line."""


def _jobs() -> int:
    return len(os.sched_getaffinity(0))


@click.command("build-llama")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default="current directory", help="llama.cpp source tree.")
@click.option("--backend", type=click.Choice(["hip", "cpu"]), default="hip", show_default=True)
@click.option("--targets", metavar="GFX,...",
              help="AMD GPU targets for hip, e.g. gfx906. Default: $LLAMACPP_ROCM_ARCH, else the "
                   "GPUs present, else gfx906.")
@click.option("--tool", "tools", multiple=True, metavar="NAME",
              help="Build only llama-server and NAME (repeatable). Default: llama-server, "
                   "llama-cli, llama-bench and rpc-server where the source has them.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Where builds go. Default: /var/lib/mi50d/llama as root, else "
                   "~/.local/share/mi50d/llama.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=_jobs,
              show_default="number of CPUs")
@click.option("--force", is_flag=True, help="Rebuild even if an identical build exists.")
@click.option("--prune", type=click.IntRange(min=1), metavar="N",
              help="Afterwards delete all but the N newest builds (never the current one).")
@click.option("--sysfs-root", type=click.Path(path_type=Path), default="/sys", hidden=True)
def build_llama(source: Path, backend: str, targets: str | None, tools: tuple[str, ...],
                root: Path | None, jobs: int, force: bool, prune: int | None,
                sysfs_root: Path) -> None:
    """Build llama-server (hip for MI50, or cpu) into <root>/<build-id> and point <root>/current
    at it once it runs."""
    from mi50d.llama import build

    env = dict(os.environ)
    root = (root or build.default_root()).absolute()
    source = source.absolute()
    kind: build.Backend = "hip" if backend == "hip" else "cpu"
    try:
        generator = build.check_programs(kind, env)
        hip = build.hip_toolchain(env) if kind == "hip" else None
        gfx = build.resolve_targets(targets, env, sysfs_root) if kind == "hip" else ()
        plan = build.plan_build(source, root, kind, build.select_tools(source, tools), gfx,
                                jobs=jobs, hip=hip, generator=generator)
        if hip is not None:
            click.echo(f"hip build for {', '.join(gfx)}; ROCm at {hip.rocm_path}")
            for note in plan.notes:
                click.echo(f"  {note}")
        result = build.build(plan, env, force=force)
        removed = build.prune(root, prune) if prune else []
    except build.BuildError as exc:
        raise BuildFailed(str(exc)) from None
    except OSError as exc:
        raise BuildFailed(f"{exc.filename or root}: {exc.strerror}") from None
    if result.reused:
        click.echo(f"up to date: {result.build_id} (identical build; --force rebuilds)")
    else:
        click.echo(f"built {result.build_id}")
    for path in removed:
        click.echo(f"pruned {path.name}")
    click.echo(result.version.splitlines()[0] if result.version else "")
    click.echo(f"llama-server: {root / 'current' / 'bin' / 'llama-server'}")
    click.echo(f"to use it, set in {CONFIG_HINT}:\n"
               f"    llama_server = \"{root / 'current' / 'bin' / 'llama-server'}\"")
