"""API keys: `[gateway] api_key_file`, one key per line; a request carries one as
`Authorization: Bearer KEY` or `X-Api-Key: KEY`. Compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

from mi50d.config import ConfigError


def load_keys(path: Path) -> frozenset[str]:
    """The keys in `path` (blank lines and `#` comments skipped); ConfigError when unreadable or
    empty, since a gateway that nobody can use is a mistake worth stopping for."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"mi50d.toml: gateway.api_key_file: cannot read {path}: "
                           f"{exc.strerror}; fix the path or its permissions"]) from None
    keys = frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError([f"mi50d.toml: gateway.api_key_file: {path} holds no key; "
                           "write one key per line"])
    return keys


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-Api-Key") or None


def allowed(keys: frozenset[str], presented: str | None) -> bool:
    if presented is None:
        return False
    # Every key is compared, so the time taken does not tell which one nearly matched.
    return any([hmac.compare_digest(presented.encode(), k.encode()) for k in keys])
