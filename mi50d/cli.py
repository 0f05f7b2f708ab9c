"""mi50d's command line (placeholder until the daemon lands)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("mi50d: not implemented yet")
