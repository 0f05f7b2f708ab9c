"""Figures: a summary of repeated samples (median and spread) and one table row per figure.

Every row holds what mi50d did, what the baseline measured in the same run did, and the per-pair
ratio and difference, each summarised as median with its spread. Rows report; they never assert.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of n samples; `lo`/`hi` are min/max below 10 samples, else p10/p90."""

    n: int
    median: float
    lo: float
    hi: float
    spread: str  # "min-max" or "p10-p90"

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if len(values) < 10:
            return cls(len(values), statistics.median(values), min(values), max(values), "min-max")
        return cls(len(values), statistics.median(values), percentile(values, 10),
                   percentile(values, 90), "p10-p90")

    def text(self, fmt: str) -> str:
        return f"{self.median:{fmt}} [{self.lo:{fmt}}..{self.hi:{fmt}}]"


@dataclass
class Row:
    """One figure. `value` and `baseline` in `unit`; `ratio` = value/baseline per pair."""

    section: str
    figure: str
    unit: str
    value: Summary
    baseline: Summary | None = None
    baseline_label: str = ""
    ratio: Summary | None = None
    diff: Summary | None = None  # value - baseline per pair, in `unit`
    goal: str = ""
    met: bool | None = None
    fmt: str = ".1f"
    notes: list[str] = field(default_factory=list)


def paired(section: str, figure: str, unit: str, values: Sequence[float],
           baselines: Sequence[float], baseline_label: str, *, goal: str = "",
           met: bool | None = None, fmt: str = ".1f") -> Row:
    """A row from samples taken in pairs (measured i beside baseline i, in the same run)."""
    if len(values) != len(baselines):
        raise ValueError("paired samples must have equal counts")
    ratios = [v / b for v, b in zip(values, baselines, strict=True) if b > 0]
    diffs = [v - b for v, b in zip(values, baselines, strict=True)]
    return Row(section, figure, unit, Summary.of(values), Summary.of(baselines), baseline_label,
               Summary.of(ratios) if ratios else None, Summary.of(diffs), goal, met, fmt)


def _cells(row: Row) -> list[str]:
    ratio = row.ratio.text(".2f") if row.ratio else ""
    diff = row.diff.text("+" + row.fmt) if row.diff else ""
    met = {None: "", True: "met", False: "MISSED"}[row.met]
    return [
        row.section,
        row.figure,
        f"{row.value.text(row.fmt)} {row.unit} (n={row.value.n})",
        f"{row.baseline.text(row.fmt)} {row.unit} ({row.baseline_label})" if row.baseline else "",
        ratio,
        f"{diff} {row.unit}" if diff else "",
        f"{row.goal} {met}".strip(),
    ]


HEADERS = ["#", "figure", "mi50d: median [spread]", "baseline: median [spread]",
           "ratio", "difference", "goal"]


def text_table(rows: Sequence[Row]) -> str:
    """Aligned plain-text table for the terminal."""
    cells = [HEADERS, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADERS))).rstrip()
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    return "\n".join(out)
