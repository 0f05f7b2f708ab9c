"""llama-server's own /metrics of each running instance, fetched in parallel at scrape time and
re-exported with an `instance` label.

Nothing here knows llama-server's metric names (they changed in 2026): the text is parsed with
prometheus_client's parser and every family is passed on under its own name, its samples
relabelled: `instance` is set to the mi50d instance and an upstream `instance` label, if any,
becomes `exported_instance` (what Prometheus itself does on a clash). An instance that does not
answer within the timeout, answers with an error or with text that does not parse is left out
of that scrape and counted in `mi50d_upstream_scrape_errors_total{instance,reason}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_TIMEOUT_S = 2.0
MAX_BODY = 8 << 20  # far above what one llama-server reports (a few kB)
OWN_PREFIXES = ("mi50d_", "process_")  # our families; an upstream one by these names is dropped


@dataclass(frozen=True)
class Target:
    instance: str
    url: str
    api_key_file: Path | None = None


@dataclass(frozen=True)
class Fetched:
    instance: str
    text: str


class Upstream:
    """One client session (connection pool) for every instance's /metrics; `async with` it."""

    def __init__(self, registry: CollectorRegistry, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_body: int = MAX_BODY) -> None:
        self.timeout_s = timeout_s
        self.max_body = max_body
        self.errors = Counter(
            "mi50d_upstream_scrape_errors", "Scrapes of an instance's own /metrics that were "
            "left out: reason timeout, connect, http_<status>, too_large, parse or api_key",
            ["instance", "reason"], registry=registry)
        self._session: aiohttp.ClientSession | None = None
        self._counted: set[tuple[str, str]] = set()

    async def __aenter__(self) -> Upstream:
        # No total timeout on the session: each fetch runs under asyncio.timeout(timeout_s).
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_all(self, targets: Sequence[Target],
                        timeout_s: float | None = None) -> list[Fetched]:
        """Every target at once; those that answered 200 within `timeout_s` (default: ours)."""
        wait = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        found = await asyncio.gather(*(self._fetch(t, wait) for t in targets))
        return [f for f in found if f is not None]

    async def _fetch(self, target: Target, timeout_s: float) -> Fetched | None:
        assert self._session is not None, "use `async with Upstream(...)`"
        headers = {}
        if target.api_key_file is not None:
            key = _first_key(target.api_key_file)
            if key is None:
                self._count(target.instance, "api_key")
                return None
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.get(target.url, headers=headers) as resp:
                    if resp.status != 200:
                        self._count(target.instance, f"http_{resp.status}")
                        return None
                    body = await _read_limited(resp.content, self.max_body)
        except TimeoutError:
            self._count(target.instance, "timeout")
            return None
        except (aiohttp.ClientError, OSError):
            self._count(target.instance, "connect")
            return None
        if body is None:
            self._count(target.instance, "too_large")
            return None
        return Fetched(target.instance, body.decode("utf-8", "replace"))

    def _count(self, instance: str, reason: str) -> None:
        self.errors.labels(instance, reason).inc()
        self._counted.add((instance, reason))

    def forget_all_but(self, names: Iterable[str]) -> None:
        """Drop the error series of instances no longer configured (removed by a reload)."""
        keep = set(names)
        for instance, reason in [k for k in list(self._counted) if k[0] not in keep]:
            with contextlib.suppress(KeyError):
                self.errors.remove(instance, reason)
            self._counted.discard((instance, reason))

    def relabel(self, fetched: Iterable[Fetched]) -> list[Metric]:
        """The families of every answer merged by name, each sample labelled with its instance.
        A family whose type differs from the same name's in an earlier answer is dropped."""
        families: dict[str, Metric] = {}
        for answer in fetched:
            try:
                parsed = list(text_string_to_metric_families(answer.text))
            except Exception:  # foreign text: any parser failure leaves this answer out
                self._count(answer.instance, "parse")
                continue
            for fam in parsed:
                if fam.name.startswith(OWN_PREFIXES):
                    continue
                out = families.get(fam.name)
                if out is None:
                    doc = fam.documentation or f"{fam.name}, from llama-server's /metrics"
                    out = families[fam.name] = Metric(fam.name, doc, fam.type, fam.unit)
                elif out.type != fam.type:
                    continue
                for s in fam.samples:
                    labels = {("exported_instance" if k == "instance" else k): v
                              for k, v in s.labels.items()}
                    labels["instance"] = answer.instance
                    out.add_sample(s.name, labels, s.value, s.timestamp)
        return list(families.values())


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes."""
    chunks, size = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _first_key(path: Path) -> str | None:
    """The first key of an api_key_file (llama-server reads one key per line)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    return next((line.strip() for line in lines if line.strip()), None)
