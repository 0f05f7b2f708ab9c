"""The models the real llama-server loads, from `mi50d.llama.tinymodel` (cached where the test suite
caches them): the tiny one the tests use, and a larger one whose load takes seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mi50d.llama import source as llamasrc
from mi50d.llama import tinymodel

LARGE_MB = 800
LARGE_MB_QUICK = 400
# Direct I/O: every load reads the file from the disk, as a first load after boot does, instead
# of mapping pages that are already cached (which makes any size load in a fraction of a second).
LARGE_ARGS = ("--load-mode", "dio")


@dataclass(frozen=True)
class Models:
    tiny: Path | None  # None: the fake server stands in (see --fake)
    large: Path | None
    large_label: str
    describe: str
    large_args: tuple[str, ...] = LARGE_ARGS


def make_models(fake: bool, quick: bool) -> Models:
    if fake:
        return Models(None, None, "large", "none: the FAKE SERVER stands in for llama-server")
    vocab = llamasrc.ensure_source() / tinymodel.VOCAB_FILE
    cache = llamasrc.cache_root() / "models"
    tiny = tinymodel.cached(cache, vocab)
    size = LARGE_MB_QUICK if quick else LARGE_MB
    large = tinymodel.cached(cache, vocab, tinymodel.TinyModel(size_mb=size))
    mib = large.stat().st_size / 2**20
    return Models(tiny, large, f"{mib:.0f} MiB",
                  f"tiny {tiny.stat().st_size / 2**10:.0f} KiB ({tiny.name}) and {mib:.0f} MiB "
                  f"({large.name}, loaded with `{' '.join(LARGE_ARGS)}`), f16, from "
                  f"mi50d.llama.tinymodel, cached in {cache}")
