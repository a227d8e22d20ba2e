"""Settings: a TOML file, then command-line flags on top.

Every problem is a :class:`ConfigError` naming the key (``engine.window``,
``--kamailio``) and what is wrong with it, so ``run`` can print one line and
exit with code 2.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .capture import CaptureSettings
from .engine import Anchor, EngineSettings, Strategy
from .evapi_client import Backoff, NodeAddress
from .netstring import DEFAULT_MAX_FRAME
from .sipp_runner import SippSettings

__all__ = ["Config", "ConfigError", "load_config", "parse_hostport", "parse_metrics", "parse_node"]

DEFAULT_EVAPI: Final = "127.0.0.1:8448"
DEFAULT_SIP_PORT: Final = 5060
DEFAULT_METRICS: Final = "127.0.0.1:9848"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,252})")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting that cannot be used; ``key`` says which."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class CommandSettings:
    ack_timeout: float = 1.0  # how long a command waits for Kamailio's acknowledgement
    pin_ttl: int = 30  # seconds Kamailio keeps a pinned route for a fake call
    # Seconds between liveness pings; a ping not acknowledged in ack_timeout
    # means the node is gone (frozen, half-open connection): reconnect. 0: off.
    ping_interval: float = 5.0
    # Overload: with more than shed_above bytes waiting unread on a node's
    # socket, events are counted and dropped (acknowledgements kept) until
    # fewer than shed_below wait. 0: never shed.
    shed_above: int = 4 << 20
    shed_below: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Config:
    nodes: tuple[NodeAddress, ...] = ()
    engine: EngineSettings = field(default_factory=EngineSettings)
    sipp: SippSettings = field(default_factory=SippSettings)
    commands: CommandSettings = field(default_factory=CommandSettings)
    backoff: Backoff = field(default_factory=Backoff)
    max_frame: int = DEFAULT_MAX_FRAME
    sequence_grace: float = 2.0
    action_queue: int = 10_000
    log_level: str = "info"
    metrics: tuple[str, int] | None = None  # where /metrics and /healthz listen; None: nowhere
    capture: CaptureSettings | None = None  # where received frames are recorded; None: nowhere
    state_file: Path | None = None  # engine state kept on disk while running, restored at start
    state_interval: float = 1.0  # at most this long between snapshots of a changing state
    shutdown_grace: float = 10.0  # how long running fake calls may finish at shutdown


def parse_hostport(text: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; the port may default."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(key, f"{text!r} has an unclosed '['")
        port_text = rest[1:] if rest.startswith(":") else rest
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise ConfigError(key, f"{text!r}: write an IPv6 address as [addr]:port")
        if not host:
            raise ConfigError(key, f"{text!r} has no host")
        if not _HOST_RE.fullmatch(host):
            raise ConfigError(key, f"{host!r} is not a hostname or IP address")
    if not port_text:
        if default_port is None:
            raise ConfigError(key, f"{text!r} has no port")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(key, f"{port_text!r} is not a port number (1-65535)")
    return host, int(port_text)


def parse_metrics(text: str, key: str) -> tuple[str, int] | None:
    """``HOST:PORT`` for the metrics endpoint, or ``off``."""
    return None if text == "off" else parse_hostport(text, key)


def parse_node(spec: str, key: str = "--kamailio") -> NodeAddress:
    """``[NAME=]HOST:PORT[,sip=HOST:PORT]``; the SIP address defaults to HOST:5060."""
    name = ""
    main, _, options = spec.partition(",")
    if "=" in main:
        name, _, main = main.partition("=")
    evapi_host, evapi_port = parse_hostport(main, key)
    sip_host, sip_port = evapi_host, DEFAULT_SIP_PORT
    for option in filter(None, options.split(",")):
        opt_key, eq, value = option.partition("=")
        if opt_key != "sip" or not eq:
            raise ConfigError(key, f"unknown option {option!r} (expected sip=HOST:PORT)")
        sip_host, sip_port = parse_hostport(value, key, DEFAULT_SIP_PORT)
    return _node(name or f"{evapi_host}:{evapi_port}", evapi_host, evapi_port, sip_host, sip_port, key)


def _node(name: str, evapi_host: str, evapi_port: int, sip_host: str, sip_port: int, key: str) -> NodeAddress:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(key, f"node name {name!r} must be 1-64 letters, digits or _.:-")
    return NodeAddress(name, evapi_host, evapi_port, sip_host, sip_port)


class _Table:
    """Typed reads from one TOML table; unknown keys are errors."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, not {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; no setting means them
            raise ConfigError(self.key(name), f"must be a finite number, not {value!r}")
        if value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum:g}")
        return float(value)

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be a whole number, not {value!r}")
        if value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}")
        return value

    def string(self, name: str, default: str) -> str:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"must be a non-empty string, not {value!r}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), "must be a list of non-empty strings")
        return tuple(value)

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _table(doc: _Table, name: str) -> _Table:
    value = doc.get(name)
    if value is None:
        return _Table({}, f"{name}.")
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table")
    return _Table(value, f"{name}.")


def _engine(t: _Table) -> EngineSettings:
    d = EngineSettings()
    anchor = t.string("anchor", d.anchor.value)
    strategy = t.string("strategy", d.strategy.value)
    try:
        anchor_value = Anchor(anchor)
    except ValueError:
        raise ConfigError(t.key("anchor"), f"must be 'end' or 'start', not {anchor!r}") from None
    try:
        strategy_value = Strategy(strategy)
    except ValueError:
        raise ConfigError(t.key("strategy"), f"must be 'fake_call' or 'message', not {strategy!r}") from None
    user_agents = t.strings("user_agents", d.user_agents)
    for pattern in user_agents:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(t.key("user_agents"), f"{pattern!r} is not a regular expression: {exc}") from None
    settle = t.number("settle", d.settle)
    deadline = t.number("deadline", d.deadline)
    if settle > deadline:
        raise ConfigError(t.key("settle"), f"must not be longer than engine.deadline ({deadline:g})")
    return EngineSettings(
        window=t.number("window", d.window),
        anchor=anchor_value,
        strategy=strategy_value,
        settle=settle,
        deadline=deadline,
        ring_timeout=t.number("ring_timeout", d.ring_timeout),
        user_agents=user_agents,
        push_providers=t.strings("push_providers", d.push_providers),
        max_calls=t.integer("max_calls", d.max_calls, 1),
        max_devices=t.integer("max_devices", d.max_devices, 1),
    )


def _sipp(t: _Table) -> SippSettings:
    d = SippSettings()
    scenario = t.get("scenario")
    if scenario is not None and (not isinstance(scenario, str) or not scenario):
        raise ConfigError(t.key("scenario"), "must be a file path")
    transport = t.string("transport", "udp")
    if transport not in ("udp", "tcp"):
        raise ConfigError(t.key("transport"), f"must be 'udp' or 'tcp', not {transport!r}")
    max_concurrent = t.integer("max_concurrent", d.max_concurrent, 1)
    port_base = t.integer("port_base", d.port_base)
    if port_base and port_base + max_concurrent > 65536:
        raise ConfigError(t.key("port_base"), "leaves no room for max_concurrent ports")
    timeout = t.number("timeout", d.timeout)
    if timeout <= 0:
        raise ConfigError(t.key("timeout"), "must be positive")
    return SippSettings(
        binary=t.string("binary", d.binary),
        scenario=Path(scenario) if scenario else None,
        max_concurrent=max_concurrent,
        timeout=timeout,
        local_ip=t.string("local_ip", d.local_ip),
        port_base=port_base,
        transport="u1" if transport == "udp" else "t1",
    )


def _nodes(doc: _Table) -> tuple[NodeAddress, ...]:
    value = doc.get("kamailio")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("kamailio", "must be an array of tables ([[kamailio]])")
    nodes = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"kamailio[{index}]", "must be a table")
        t = _Table(item, f"kamailio[{index}].")
        evapi_host, evapi_port = parse_hostport(t.string("evapi", DEFAULT_EVAPI), t.key("evapi"))
        sip = t.get("sip")
        if sip is not None and not isinstance(sip, str):
            raise ConfigError(t.key("sip"), "must be a string HOST:PORT")
        sip_host, sip_port = (evapi_host, DEFAULT_SIP_PORT)
        if sip:
            sip_host, sip_port = parse_hostport(sip, t.key("sip"), DEFAULT_SIP_PORT)
        name = t.string("name", f"{evapi_host}:{evapi_port}")
        t.check_unknown()
        nodes.append(_node(name, evapi_host, evapi_port, sip_host, sip_port, t.key("name")))
    return tuple(nodes)


def load_config(path: Path | None) -> Config:
    """Read a TOML file into :class:`Config` (defaults when ``path`` is None)."""
    if path is None:
        return Config(metrics=parse_hostport(DEFAULT_METRICS, "metrics"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    doc = _Table(data, "")
    log_level = doc.string("log_level", "info")
    if log_level not in _LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    metrics = parse_metrics(doc.string("metrics", DEFAULT_METRICS), "metrics")
    state_file = doc.get("state_file")
    if state_file is not None and (not isinstance(state_file, str) or not state_file):
        raise ConfigError("state_file", "must be a file path")
    nodes = _nodes(doc)
    engine_t, sipp_t, evapi_t = _table(doc, "engine"), _table(doc, "sipp"), _table(doc, "evapi")
    capture_t = _table(doc, "capture")
    capture = None
    if capture_t.data:
        d_cap = CaptureSettings(Path("."))
        folder = capture_t.get("folder")
        if not isinstance(folder, str) or not folder:
            raise ConfigError("capture.folder", "is required: the folder for capture files")
        capture = CaptureSettings(
            folder=Path(folder),
            max_bytes=capture_t.integer("max_bytes", d_cap.max_bytes, 4096),
            max_age=capture_t.number("max_age", d_cap.max_age, 1),
            keep=capture_t.integer("keep", d_cap.keep, 1),
        )
    engine = _engine(engine_t)
    sipp = _sipp(sipp_t)
    d = Config()
    backoff = Backoff(
        initial=evapi_t.number("reconnect_initial", Backoff().initial, 0.001),
        cap=evapi_t.number("reconnect_max", Backoff().cap, 0.001),
    )
    commands = CommandSettings(
        ack_timeout=evapi_t.number("ack_timeout", CommandSettings().ack_timeout, 0.001),
        pin_ttl=evapi_t.integer("pin_ttl", CommandSettings().pin_ttl, 1),
        ping_interval=evapi_t.number("ping_interval", CommandSettings().ping_interval),
        shed_above=evapi_t.integer("shed_above", CommandSettings().shed_above),
        shed_below=evapi_t.integer("shed_below", CommandSettings().shed_below),
    )
    config = Config(
        nodes=_unique(nodes),
        engine=engine,
        sipp=sipp,
        commands=commands,
        backoff=backoff,
        max_frame=evapi_t.integer("max_frame", d.max_frame, 64),
        sequence_grace=evapi_t.number("sequence_grace", d.sequence_grace),
        action_queue=doc.integer("action_queue", d.action_queue, 1),
        log_level=log_level,
        metrics=metrics,
        capture=capture,
        state_file=Path(state_file) if state_file else None,
        state_interval=doc.number("state_interval", d.state_interval, 0.05),
        shutdown_grace=doc.number("shutdown_grace", d.shutdown_grace),
    )
    for table in (engine_t, sipp_t, evapi_t, capture_t, doc):
        table.check_unknown()
    return config


def _unique(nodes: tuple[NodeAddress, ...]) -> tuple[NodeAddress, ...]:
    names = [n.name for n in nodes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("kamailio", f"node name {name!r} is used twice")
    return nodes


def with_nodes(config: Config, nodes: tuple[NodeAddress, ...]) -> Config:
    """The config with the nodes given on the command line."""
    return replace(config, nodes=_unique(nodes))
