"""The value types of the configuration, each checked strictly as pydantic validates: no NUL
bytes in anything that becomes an argument, path or environment entry, absolute paths, host names
llama-server can bind, and no string-to-number or string-to-bool coercion (`port = "8080"` is an
error, not 8080); and how pydantic's errors read as `file: key: problem; fix` lines. A leaf, like
`mi50d.config` which is built from these.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, Strict, ValidationError

_NAMES_KEYS = re.compile(r"[a-z_]+(?:, [a-z_]+)*: ")
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


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address, or None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    ip = ip_of(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def _host(value: str) -> str:
    """An IP address or an RFC 1123 host name that getaddrinfo can take."""
    if ip_of(value) is not None:
        return value
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


def _rpc_endpoint(value: str) -> str:
    """HOST:PORT of an RPC worker as llama.cpp's --rpc takes it: it splits at the first ':', so
    the host is a host name or an IPv4 address, never IPv6."""
    host, sep, port = value.partition(":")
    fix = 'write HOST:PORT, e.g. "10.0.0.2:50052"'
    if value.startswith("[") or value.count(":") > 1:
        raise ValueError(f"{value[:80]!r}: llama.cpp's --rpc takes no IPv6 addresses; {fix} "
                         "with an IPv4 address or a host name")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value[:80]!r} is not HOST:PORT; {fix}")
    _host(host)
    return value


def rpc_host_port(endpoint: str) -> tuple[str, int]:
    """A validated RpcEndpoint as (host, port)."""
    host, _, port = endpoint.partition(":")
    return host, int(port)


def _allow(value: str) -> str:
    """A client address or network allowed to reach an RPC worker: "10.0.0.1", "10.0.0.0/24",
    "fd00::/64"; written as systemd's IPAddressAllow= takes it."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value[:80]!r} is not an IP address or network; use e.g. "
                         '"10.0.0.1" or "10.0.0.0/24"') from None


PositiveSeconds = Annotated[float, Strict(), Field(gt=0)]
Seconds = Annotated[float, Strict(), Field(ge=0)]
Text = Annotated[str, Strict(), AfterValidator(_text)]
AbsPath = Annotated[Path, BeforeValidator(_path)]
Count = Annotated[int, Strict(), Field(ge=1)]
Flag = Annotated[bool, Strict()]
EnvKey = Annotated[str, Strict(), AfterValidator(_env_key)]
Host = Annotated[Text, AfterValidator(_host)]
RpcEndpoint = Annotated[Text, AfterValidator(_rpc_endpoint)]
AllowedAddress = Annotated[Text, AfterValidator(_allow)]


def shown(text: str) -> str:
    """`text` safe to print on one line: undecodable bytes and control characters escaped."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else repr(text)[1:-1]


_TYPE_ERRORS = frozenset({"int_type", "bool_type", "float_type", "string_type"})


def describe_errors(path: Path, exc: ValidationError, model: type[BaseModel],
                    prefix: tuple[str, ...] = ()) -> list[str]:
    """One `file: key: problem; fix` line per error of `model` validating `path`'s table
    (`prefix`: where that table sits in the file)."""
    lines = []
    for err in exc.errors():
        where = err["loc"]
        if where[-1:] == ("[key]",):  # a bad key of a table such as env
            where = where[:-1]
        loc = shown(".".join(str(p) or '""' for p in (*prefix, *where))) or "(file)"
        if loc == "(file)" and _NAMES_KEYS.match(err["msg"].removeprefix("Value error, ")):
            loc = ""  # a rule across keys whose message begins with the keys it is about
        kind = err["type"]
        if kind == "extra_forbidden":
            known = known_keys(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            lines.append(f"{shown(path.name)}: {loc}: unknown key; {hint}")
        elif kind == "missing":
            lines.append(f"{shown(path.name)}: {loc}: required key is missing; "
                         f"add `{loc} = ...`")
        else:
            msg = shown(err["msg"].removeprefix("Value error, "))
            if kind in _TYPE_ERRORS:
                got = err["input"]
                msg += f" (got {type(got).__name__} {shown(repr(got)[:40])})"
                if kind == "bool_type":
                    msg += "; write true or false, without quotes"
                elif isinstance(got, str):
                    msg += "; write the number without quotes"
                elif kind == "int_type" and isinstance(got, float):
                    msg += "; write a whole number"
            lines.append(f"{shown(path.name)}: {loc}: {msg}" if loc else
                         f"{shown(path.name)}: {msg}")
    return lines


def known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)
