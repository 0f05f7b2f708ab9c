"""The value types of the configuration, each checked strictly as pydantic validates: no NUL
bytes in anything that becomes an argument, path or environment entry, absolute paths, host names
llama-server can bind, and no string-to-number or string-to-bool coercion (`port = "8080"` is an
error, not 8080). A leaf, like `mi50d.config` which is built from these.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, Strict

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _text(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL byte (\\u0000), which no argument, path or environment "
                         "variable can hold; remove it")
    return value


def _path(value: object) -> object:
    """Paths are absolute strings: mi50d runs from "/", so a relative one would mean something
    else there than where the file was written."""
    if not isinstance(value, str | Path):
        raise ValueError('must be a path string, e.g. "/mnt/ssd/models/model.gguf"')
    text = _text(str(value))
    if not text.startswith("/"):
        raise ValueError(f'{text!r} is relative; write the full path, starting with "/"')
    return value


def _env_key(value: str) -> str:
    if not value or "=" in value or "\0" in value:
        raise ValueError(f"{value!r} is not a variable name (empty, or has '=' or a NUL byte); "
                         "use e.g. HSA_OVERRIDE_GFX_VERSION")
    return value


def _host(value: str) -> str:
    """An IP address or an RFC 1123 host name that getaddrinfo can take."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    fix = 'use an address of this machine, e.g. "127.0.0.1" or "0.0.0.0" for all'
    if value.startswith("["):
        raise ValueError(f"write an IPv6 address without brackets; {fix}")
    if re.fullmatch(r"[0-9.]+", value) or len(value) > 253:
        raise ValueError(f"{value[:80]!r} is not a valid address; {fix}")
    for label in value.split("."):
        if len(label) > 63:
            raise ValueError(f"host name label {label[:20]!r}... is {len(label)} characters "
                             f"(at most 63); {fix}")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{value[:80]!r} is not an IP address or host name (labels of "
                             f"letters, digits and '-' between dots); {fix}")
    return value


PositiveSeconds = Annotated[float, Strict(), Field(gt=0)]
Seconds = Annotated[float, Strict(), Field(ge=0)]
Text = Annotated[str, Strict(), AfterValidator(_text)]
AbsPath = Annotated[Path, BeforeValidator(_path)]
Count = Annotated[int, Strict(), Field(ge=1)]
Flag = Annotated[bool, Strict()]
EnvKey = Annotated[str, Strict(), AfterValidator(_env_key)]
Host = Annotated[Text, AfterValidator(_host)]


def shown(text: str) -> str:
    """`text` safe to print on one line: undecodable bytes and control characters escaped."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else repr(text)[1:-1]
