"""Configuration: the pydantic models of `/etc/mi50d/*.toml` and `load_config(dir)`.

`mi50d.toml` holds the daemon's own settings; every other `*.toml` is one instance, named by its file
stem. Everything is frozen and `extra="forbid"`: a typo is an error naming the file, the key and a fix.
This module owns turning a directory into a `Config` or one `ConfigError`; it never exits.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mi50d.configtypes import (
    AbsPath,
    AllowedAddress,
    Count,
    EnvKey,
    Flag,
    Host,
    PositiveSeconds,
    RpcEndpoint,
    Seconds,
    Text,
    describe_errors,
    ip_of,
    is_loopback,
    shown,
)

DAEMON_FILE = "mi50d.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_FILE = 1 << 20
MAX_NAME = 64  # instance names appear in unit names, logs and table columns
DEFAULT_CONFIG_DIR = Path("/etc/mi50d")
DEFAULT_SOCKET = Path("/run/mi50d/control.sock")
DEFAULT_LLAMA_SERVER = Path("/var/lib/mi50d/llama/current/bin/llama-server")
DEFAULT_CACHE_DIR = Path("/var/lib/mi50d/cache")
# llama.cpp's RPC worker, newest name first; looked for beside llama_server.
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
WORKER = "rpc-worker"
# The keys an rpc-worker file may set; every other key is llama-server's.
WORKER_KEYS = frozenset({"kind", "host", "port", "gpus", "cache", "allow", "threads", "env",
                         "args", "rpc_server", "autostart", "requires_mounts", "restart",
                         "health", "stop"})

# Variables that select GPUs. mi50d sets exactly one of them (ROCR_VISIBLE_DEVICES) from `gpus`;
# inheriting another would filter the already-filtered list a second time (see `gpu_environment`).
GPU_SELECT_VARS = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
                   "GPU_DEVICE_ORDINAL")


class ConfigError(Exception):
    """One or more configuration problems; each line reads `file: key: problem`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartConfig(_Model):
    """When a process that ended is started again (see `mi50d.engine.policy`)."""

    policy: Literal["always", "on-failure", "never"] = "on-failure"
    delay_s: Seconds = 1.0
    max_delay_s: Seconds = 30.0
    burst: Count = 5
    interval_s: PositiveSeconds = 120.0

    @model_validator(mode="after")
    def _delays_ordered(self) -> RestartConfig:
        if self.max_delay_s < self.delay_s:
            raise ValueError("max_delay_s must be >= delay_s")
        return self


class HealthConfig(_Model):
    """How readiness and hangs are detected over HTTP."""

    path: Annotated[str, Strict()] = "/health"
    interval_s: PositiveSeconds = 5.0
    timeout_s: PositiveSeconds = 3.0
    failures: Count = 3
    start_timeout_s: PositiveSeconds = 900.0

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        # it goes into the request line: no spaces or control characters
        if not value.startswith("/") or not all("!" <= c <= "~" for c in value):
            raise ValueError("must start with '/' and hold no spaces or control characters, "
                             "e.g. \"/health\"")
        return value


class StopConfig(_Model):
    timeout_s: PositiveSeconds = 20.0


class InstanceSettings(_Model):
    """The keys of one instance file (`<name>.toml`); these names are a public contract."""

    kind: Literal["llama-server", "rpc-worker"] = "llama-server"
    model: AbsPath | None = None  # required for llama-server
    mmproj: AbsPath | None = None
    host: Host = "127.0.0.1"
    port: Annotated[int, Strict(), Field(ge=1, le=65535)]
    ctx_size: Annotated[int, Strict(), Field(ge=0)] | None = None
    n_gpu_layers: int | Literal["auto", "all"] | None = None
    flash_attn: Literal["on", "off", "auto"] | None = None
    jinja: Flag = False
    threads: Count | None = None
    alias: Text | None = None
    api_key_file: AbsPath | None = None
    temp: Annotated[float, Strict(), Field(ge=0)] | None = None
    top_p: Annotated[float, Strict(), Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Strict(), Field(ge=0)] | None = None
    presence_penalty: Annotated[float, Strict()] | None = None
    gpus: tuple[Annotated[int, Strict(), Field(ge=0)], ...] | None = None
    env: dict[EnvKey, Text] = Field(default_factory=dict)
    args: tuple[Text, ...] = ()
    llama_server: AbsPath | None = None
    autostart: Flag = False
    requires_mounts: tuple[AbsPath, ...] = ()
    force_vram: Flag = False
    metrics: Flag = True  # llama-server's /metrics, re-exported by mi50d.metrics
    on_demand: Flag = False  # the gateway starts it on a request and may stop it (mi50d.gateway)
    idle_unload_s: PositiveSeconds | None = None  # on_demand only: stop after this long unused
    rpc: tuple[RpcEndpoint, ...] = ()  # RPC workers the model is split over (--rpc)
    cache: Flag = False  # rpc-worker: its local tensor cache (-c), under the daemon's cache_dir
    allow: tuple[AllowedAddress, ...] = ()  # rpc-worker: the clients allowed to connect
    rpc_server: AbsPath | None = None  # rpc-worker: the binary; default beside llama_server
    restart: RestartConfig = RestartConfig()
    health: HealthConfig = HealthConfig()
    stop: StopConfig = StopConfig()

    @field_validator("n_gpu_layers", mode="before")
    @classmethod
    def _layers(cls, value: object) -> object:
        if value is None or value in ("auto", "all") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return value
        raise ValueError(
            'use a number of layers (0 or more), "auto" or "all" '
            '(in current llama.cpp -1 means "auto", not "all")'
        )

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and not value:
            raise ValueError("[] selects no GPU; list GPU indices, or remove gpus and set "
                             "n_gpu_layers = 0 to run on the CPU")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{list(value)} names a GPU twice; list each index once")
        return value

    @model_validator(mode="after")
    def _one_gpu_selector(self) -> InstanceSettings:
        clash = [v for v in GPU_SELECT_VARS if v in self.env]
        if self.gpus is not None and clash:
            raise ValueError(
                f"gpus and env.{clash[0]} both select GPUs; keep only `gpus` "
                "(mi50d turns it into ROCR_VISIBLE_DEVICES)"
            )
        return self

    @model_validator(mode="after")
    def _kind_keys(self) -> InstanceSettings:
        if self.kind == WORKER:
            foreign = sorted(k for k in self.model_fields_set
                             if k not in WORKER_KEYS | {"name", "source"})
            if foreign:
                raise ValueError(f"{', '.join(foreign)}: not a key of an rpc-worker (it serves "
                                 "its devices to a llama-server instance, which has the model "
                                 "and its settings); remove it")
            if not is_loopback(self.host) and not self.allow:
                raise ValueError(f"host, allow: an rpc-worker on {self.host} needs allow = [\"ADDR\", ...], "
                                 "the clients that may connect (llama.cpp's RPC server has no "
                                 "authentication); or host = \"127.0.0.1\"")
            return self
        if self.model is None:
            raise ValueError("model: required key is missing; add `model = ...`")
        own = sorted(k for k in ("cache", "allow", "rpc_server") if k in self.model_fields_set)
        if own:
            raise ValueError(f"{', '.join(own)}: only for kind = \"rpc-worker\"; remove it")
        return self

    @field_validator("idle_unload_s")
    @classmethod
    def _idle_needs_on_demand(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not info.data.get("on_demand"):
            raise ValueError("only on_demand instances are unloaded by the gateway; set "
                             "on_demand = true or remove idle_unload_s")
        return value


class InstanceConfig(InstanceSettings):
    """An instance as the supervisor sees it: its settings plus its name and source file."""

    name: str
    source: Path

    @property
    def is_worker(self) -> bool:
        return self.kind == WORKER

    def binary(self, daemon: DaemonConfig) -> Path:
        if self.is_worker:
            return self.rpc_server or daemon.rpc_server or rpc_server_beside(daemon.llama_server)
        return self.llama_server or daemon.llama_server

    def client_networks(self) -> tuple[str, ...]:
        """Where an rpc-worker on a non-loopback address may be reached from: `allow`, loopback,
        and its own address (mi50d's health probe comes from there); () for no restriction."""
        if not self.is_worker or is_loopback(self.host):
            return ()
        ip = ip_of(self.host)
        own = [self.host] if ip is not None and not ip.is_unspecified else []
        return tuple(dict.fromkeys([*self.allow, "127.0.0.0/8", "::1/128", *own]))

    def cache_dir(self, daemon: DaemonConfig) -> Path | None:
        """An rpc-worker's tensor cache: llama.cpp keeps it in $LLAMA_CACHE/rpc."""
        return daemon.cache_dir / self.name if self.is_worker and self.cache else None

    @property
    def model_name(self) -> str:
        """The name clients ask for and responses carry: `alias`, else the instance's name."""
        return self.alias or self.name

    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def argv(self, daemon: DaemonConfig) -> list[str]:
        """The exact command line: llama-server's, or an rpc-worker's."""
        if self.is_worker:
            argv = [str(self.binary(daemon)), "--host", self.host, "--port", str(self.port)]
            if self.threads is not None:
                argv += ["--threads", str(self.threads)]
            return [*argv, *(["--cache"] if self.cache else []), *self.args]
        argv = [str(self.binary(daemon)), "--model", str(self.model)]
        if self.mmproj is not None:
            argv += ["--mmproj", str(self.mmproj)]
        argv += ["--host", self.host, "--port", str(self.port)]
        optional: list[tuple[str, object]] = [
            ("--ctx-size", self.ctx_size),
            ("--n-gpu-layers", self.n_gpu_layers),
            ("--flash-attn", self.flash_attn),
            ("--threads", self.threads),
            ("--alias", self.model_name),
            ("--api-key-file", self.api_key_file),
            ("--temp", self.temp),
            ("--top-p", self.top_p),
            ("--top-k", self.top_k),
            ("--presence-penalty", self.presence_penalty),
        ]
        for flag, value in optional:
            if value is not None:
                argv += [flag, str(value)]
        if self.jinja:
            argv.append("--jinja")
        if self.metrics:
            argv.append("--metrics")
        if self.rpc:
            argv += ["--rpc", ",".join(self.rpc)]
        argv += list(self.args)
        return argv

    def environment(self, base: Mapping[str, str],
                    daemon: DaemonConfig | None = None) -> dict[str, str]:
        """The child's environment: `base` minus systemd's and GPU-selection variables, plus ours."""
        drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "MI50D_SOCKET"}
        if self.gpus is not None:
            drop.update(GPU_SELECT_VARS)
        env = {k: v for k, v in base.items() if k not in drop}
        env.update(gpu_environment(self.gpus))
        if self.is_worker:  # its cache is ours to place, or none
            env.pop("LLAMA_CACHE", None)
            cache = self.cache_dir(daemon) if daemon is not None else None
            if cache is not None:
                env["LLAMA_CACHE"] = str(cache)
        env.update(self.env)
        return env


def rpc_server_beside(llama_server: Path) -> Path:
    """The RPC worker binary in llama_server's directory: the first name that exists, else the
    newest name (for preflight to report missing)."""
    for name in RPC_SERVER_NAMES:
        if (llama_server.parent / name).exists():
            return llama_server.parent / name
    return llama_server.parent / RPC_SERVER_NAMES[0]


def gpu_environment(gpus: tuple[int, ...] | None) -> dict[str, str]:
    """Device visibility for `gpus`, as ROCR_VISIBLE_DEVICES only.

    ROCR_VISIBLE_DEVICES filters at the ROCr runtime, in the order rocminfo and the KFD topology
    list GPUs, and hides the others from every library in the process. HIP_VISIBLE_DEVICES filters
    again, counting within what ROCr left: ROCR=1 plus HIP=1 asks for the second of one GPU and
    leaves none. So we set one variable, the lower one, and clear the others.
    """
    if gpus is None:
        return {}
    return {"ROCR_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}


class HostPaths(_Model):
    """Where host facts are read from; tests point these at recorded fixture trees."""

    sysfs_root: AbsPath = Path("/sys")
    dev_root: AbsPath = Path("/dev")
    rocm_path: AbsPath = Path("/opt/rocm")
    mountinfo: AbsPath = Path("/proc/self/mountinfo")


class GatewayConfig(_Model):
    """`[gateway]` in mi50d.toml: the one OpenAI endpoint for every instance (`mi50d.gateway`)."""

    listen: Text = ""  # "HOST:PORT"; empty: no gateway
    api_key_file: AbsPath | None = None  # one key per line; every route but /health needs one
    max_queue: Annotated[int, Strict(), Field(ge=0)] = 64  # requests waiting per model; then 429
    swap_wait_s: PositiveSeconds = 120.0  # how long a swap waits for a victim's requests
    max_body_bytes: Annotated[int, Strict(), Field(ge=1024)] = 64 << 20  # base64 images; 413
    # Front processes serving requests to running instances beside the daemon's own loop
    # (mi50d.gateway.front); 0: the daemon serves every request itself.
    workers: Annotated[int, Strict(), Field(ge=0, le=64)] = 0

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and listen_address(value) is None:
            raise ValueError(f"{value!r} is not HOST:PORT; e.g. \"127.0.0.1:8070\" "
                             "(\"[::1]:8070\" for IPv6), or \"\" for no gateway")
        return value

    def address(self) -> tuple[str, int] | None:
        return listen_address(self.listen) if self.listen else None


def listen_address(text: str) -> tuple[str, int] | None:
    """Parse HOST:PORT: `127.0.0.1:8070` -> ("127.0.0.1", 8070), `[::1]:8070` -> ("::1", 8070);
    None when it is not of that form."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


class DaemonConfig(_Model):
    """`mi50d.toml`: daemon-wide settings, all optional."""

    llama_server: AbsPath = DEFAULT_LLAMA_SERVER
    rpc_server: AbsPath | None = None  # rpc-workers' binary; default beside llama_server
    cache_dir: AbsPath = DEFAULT_CACHE_DIR  # rpc-workers' tensor caches, one directory each
    socket: AbsPath = DEFAULT_SOCKET
    socket_group: Text = "mi50d"
    user: Text = "mi50d"
    wait_ready: Flag = False
    log_lines: Annotated[int, Strict(), Field(ge=10, le=100_000)] = 2000
    preflight: Flag = True
    host: HostPaths = HostPaths()
    gateway: GatewayConfig = GatewayConfig()
    defaults: dict[str, Any] = Field(default_factory=dict)


class Config(_Model):
    directory: Path
    daemon: DaemonConfig
    instances: dict[str, InstanceConfig]


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """The file's table; a FIFO or device is refused without opening it for reading, which could
    block (O_NONBLOCK), and a file over MAX_FILE is refused without reading it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{shown(path.name)}: not a regular file; replace it with one")
                return None
            if st.st_size > MAX_FILE:
                problems.append(f"{shown(path.name)}: {st.st_size} bytes, over the "
                                f"{MAX_FILE >> 10} KiB a configuration file may have")
                return None
            return tomllib.loads(f.read(MAX_FILE + 1).decode("utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(f"{shown(path.name)}: not UTF-8 (byte {exc.start}); save it as UTF-8")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{shown(path.name)}: not valid TOML: {exc}; fix the syntax at that line")
    except OSError as exc:
        problems.append(f"{shown(path.name)}: cannot read: {exc.strerror}")
    return None


def _merge_defaults(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Instance keys over `[defaults]`; sub-tables ([restart], [health], [stop], env) merge by key."""
    merged = dict(defaults)
    for key, value in own.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def _valid_defaults(path: Path, defaults: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`[defaults]` checked once, as the daemon file's problem: (the keys that are fine, problems).
    Instance files then merge only the good keys, so one typo is not blamed on every instance."""
    placeholders = {"model": "/", "port": 1}
    try:
        InstanceSettings.model_validate({**placeholders, **defaults})
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        whole = any(not e["loc"] for e in exc.errors())
        good = {} if whole else {k: v for k, v in defaults.items() if k not in bad}
        return good, describe_errors(path, exc, InstanceSettings, ("defaults",))
    return dict(defaults), []


def load_daemon_config(directory: Path) -> DaemonConfig:
    problems: list[str] = []
    path = directory / DAEMON_FILE
    raw = _read_toml(path, problems) if path.exists() else {}
    if raw is None:
        raise ConfigError(problems)
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(path, exc, DaemonConfig)) from None


def load_config(directory: Path) -> Config:
    """Read and validate the whole directory; raise one ConfigError listing every problem."""
    if not directory.is_dir():
        raise ConfigError([f"{directory}: not a directory; create it or pass --config-dir"])
    problems: list[str] = []
    try:
        daemon = load_daemon_config(directory)
    except ConfigError as exc:
        problems += exc.problems
        daemon = DaemonConfig()
    defaults, bad_defaults = _valid_defaults(directory / DAEMON_FILE, daemon.defaults)
    problems += bad_defaults
    instances: dict[str, InstanceConfig] = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name == DAEMON_FILE:
            continue
        name = path.stem
        if not NAME_RE.match(name) or len(name) > MAX_NAME:
            rule = ("[a-z0-9][a-z0-9._-]*" if len(name) <= MAX_NAME
                    else f"at most {MAX_NAME} characters")
            problems.append(f"{shown(path.name)[:100]}: file name: instance names are {rule}; "
                            "rename the file")
            continue
        raw = _read_toml(path, problems)
        if raw is None:
            continue
        if raw.get("kind") == WORKER:  # [defaults] are mostly llama-server keys
            defaults_here = {k: v for k, v in defaults.items() if k in WORKER_KEYS}
        else:
            defaults_here = defaults
        data = _merge_defaults(defaults_here, raw)
        try:
            InstanceSettings.model_validate(data)
            instances[name] = InstanceConfig.model_validate({**data, "name": name, "source": path})
        except ValidationError as exc:
            problems += describe_errors(path, exc, InstanceSettings)
    problems += _port_clashes(instances)
    problems += _model_name_clashes(instances)
    if problems:
        raise ConfigError(problems)
    return Config(directory=directory, daemon=daemon, instances=instances)


def _port_clashes(instances: Mapping[str, InstanceConfig]) -> list[str]:
    seen: dict[int, str] = {}
    problems = []
    for name, inst in instances.items():
        other = seen.setdefault(inst.port, name)
        if other != name:
            problems.append(f"{inst.source.name}: port: {inst.port} is already used by "
                            f"{other}.toml; pick a free port")
    return problems


def _model_name_clashes(instances: Mapping[str, InstanceConfig]) -> list[str]:
    """A request's `model` picks an instance by name or alias: each must name one instance."""
    seen: dict[str, str] = {name: name for name in instances}
    problems = []
    for name, inst in instances.items():
        if inst.alias is None or inst.alias == name:
            continue
        other = seen.setdefault(inst.alias, name)
        if other != name:
            problems.append(f"{inst.source.name}: alias: {inst.alias!r} already names instance "
                            f"{other}; pick another alias")
    return problems
