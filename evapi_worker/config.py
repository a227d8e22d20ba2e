"""Settings: a TOML file, then command-line flags on top.

Each table of the file is a settings class (``[engine]`` is
:class:`~.engine.EngineSettings`, ``[sipp]`` :class:`~.sipp_runner.SippSettings`,
``[capture]`` :class:`~.capture.CaptureSettings`, ``[evapi]``
:class:`EvapiSettings`, ``[push]`` :class:`PushSettings` with
``[push.apns]`` and ``[push.fcm]``, the top level :class:`Config`): its defaults and its
constraints are in one place, and the file and the flags are checked by the
same rules (flags are written into the file's data before it is checked).
Every problem is a :class:`ConfigError` naming the key (``engine.window``,
``--window``) and what is wrong with it, so ``run`` can print one line and
exit with code 2.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from .apns import ApnsSettings
from .capture import CaptureSettings
from .core.engine import EngineSettings, Seconds
from .core.links import Backoff, NodeAddress
from .core.msgspec_errors import read_problem
from .core.netstring import DEFAULT_MAX_FRAME
from .core.sip_values import UnsafeValue, sip_host
from .fcm import FcmSettings
from .files import FileProblem, read_regular
from .redis_client import RedisAddress, RedisTarget
from .sipp_runner import SippSettings

__all__ = [
    "Config",
    "ConfigError",
    "EvapiSettings",
    "PushSettings",
    "RedisSettings",
    "config_from",
    "load_config",
    "parse_hostport",
    "parse_metrics",
    "parse_node",
    "read_toml",
    "with_changes",
    "with_nodes",
]

DEFAULT_EVAPI: Final = "127.0.0.1:8448"
DEFAULT_SIP_PORT: Final = 5060
DEFAULT_METRICS: Final = "127.0.0.1:9848"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")

# Durations (Seconds, from engine.py) and counts: finite, never negative
# (TOML has inf and nan; no setting means them).
Positive = Annotated[float, msgspec.Meta(ge=0.001, le=86_400)]
Count = Annotated[int, msgspec.Meta(ge=0)]


_MAX_SETTINGS: Final = 1 << 20  # bytes of a settings file


class ConfigError(Exception):
    """A setting that cannot be used; ``key`` says which."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


_BACKOFF: Final = Backoff()


class EvapiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The evapi connections and the commands sent on them: ``[evapi]``."""

    reconnect_initial: Positive = _BACKOFF.initial  # backoff between reconnects, doubling...
    reconnect_max: Positive = _BACKOFF.cap  # ...up to this, with jitter
    # How long a command waits for Kamailio's acknowledgement. One process on
    # the node handles every command in turn: in a burst of a thousand late
    # phones the last pins wait for the others (about 0.6 s on two busy cores).
    ack_timeout: Positive = 3.0
    pin_ttl: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 30  # seconds Kamailio keeps a pinned route
    # Seconds between liveness pings; a ping not acknowledged in ack_timeout
    # means the node is gone (frozen, half-open connection): reconnect. 0: off.
    ping_interval: Seconds = 5.0
    # Overload: with more than shed_above bytes waiting unread on a node's
    # socket, events are counted and dropped (acknowledgements kept) until
    # fewer than shed_below wait. 0: never shed.
    shed_above: Count = 4 << 20
    shed_below: Count = 1 << 20
    max_frame: Annotated[int, msgspec.Meta(ge=64, le=1 << 26)] = DEFAULT_MAX_FRAME
    sequence_grace: Seconds = 2.0  # how long a sequence gap may stay open before it counts as lost

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.reconnect_initial, self.reconnect_max)


class PushSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[push.apns]`` and ``[push.fcm]``: the worker sends the VoIP push of
    every call to the account's push devices (off unless configured)."""

    apns: ApnsSettings | None = None
    fcm: FcmSettings | None = None
    # Seconds a push is still worth sending (retries stop then, and at the
    # call's end whichever comes first).
    give_up_after: Annotated[float, msgspec.Meta(ge=1, le=600)] = 60.0
    # Seconds Apple or Google may keep a push for a phone that is offline
    # (apns-expiration, FCM's ttl); a pushed device's REGISTER answers its
    # push until then and an engine window more (0: delivered at once or never).
    expiration: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 30
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 1000  # pushes at once; more wait their account's turn
    # One account's share: pushes at once, and devices kept (past it, the
    # account's least recently registered device is dropped, counted).
    max_in_flight_per_account: Annotated[int, msgspec.Meta(ge=1)] = 32
    rate_per_account: Annotated[float, msgspec.Meta(ge=1, le=100_000)] = 64.0  # pushes a second (and a burst as big)
    max_devices_per_account: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 32
    max_devices: Annotated[int, msgspec.Meta(ge=1)] = 100_000  # in all; past it new devices are not kept (counted)


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[redis]``: the nodes' events read from Redis streams, for nodes
    whose routes append them there (``EVW_REDIS``); commands still go over
    evapi."""

    url: str  # redis://[[user]:password@]host[:port][/db]
    # With sentinels ("HOST:PORT"), the primary they name `master` is used
    # (the URL gives the database and login), and followed after a failover.
    sentinels: tuple[str, ...] = ()
    master: str = ""
    # Seconds Redis may take to connect, log in, or answer a command (past
    # the time XREAD may block): past it, the link is dead and made again.
    timeout: float = 3.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.timeout <= 60:
            raise ValueError("timeout: from 0.1 to 60 seconds")
        try:
            RedisAddress.parse(self.url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        for sentinel in self.sentinels:
            try:
                parse_hostport(sentinel, "sentinels")
            except ConfigError as exc:
                raise ValueError(f"sentinels: {exc.problem}") from None
        if self.sentinels and not self.master:
            raise ValueError("master: the sentinels need the name of the primary they watch")

    @property
    def target(self) -> RedisTarget:
        sentinels = tuple(parse_hostport(s, "sentinels") for s in self.sentinels)
        return RedisTarget(RedisAddress.parse(self.url), sentinels, self.master, self.timeout)


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a worker needs; the top level of the settings file.

    ``nodes`` is the file's ``[[kamailio]]`` tables (or ``--kamailio``) and
    ``metrics`` its ``"HOST:PORT"`` or ``"off"``, both parsed by the loader.
    """

    nodes: tuple[NodeAddress, ...] = msgspec.field(default=(), name="kamailio")
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    sipp: SippSettings = msgspec.field(default_factory=SippSettings)
    evapi: EvapiSettings = msgspec.field(default_factory=EvapiSettings)
    capture: CaptureSettings | None = None  # where received frames are recorded; None: nowhere
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics: tuple[str, int] | None = None  # where /metrics and /healthz listen; None: nowhere
    state_file: Path | None = None  # engine state kept on disk while running, restored at start
    state_interval: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 1.0  # at most this long between journal writes
    shutdown_grace: Seconds = 10.0  # how long running fake calls may finish at shutdown
    action_queue: Annotated[int, msgspec.Meta(ge=1)] = 10_000  # actions at once; more are dropped (counted)
    push: PushSettings = msgspec.field(default_factory=PushSettings)
    redis: RedisSettings | None = None  # events from Redis streams instead of evapi; None: evapi


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
        try:
            sip_host(key, host)
        except UnsafeValue:
            raise ConfigError(key, f"{host!r} is not a hostname or IP address") from None
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


class _NodeTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[kamailio]]`` table."""

    evapi: str = DEFAULT_EVAPI
    sip: str | None = None
    name: str | None = None


def _node(name: str, evapi_host: str, evapi_port: int, sip_host: str, sip_port: int, key: str) -> NodeAddress:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(key, f"node name {name!r} must be 1-64 letters, digits or _.:-")
    return NodeAddress(name, evapi_host, evapi_port, sip_host, sip_port)


def _nodes(value: object) -> tuple[NodeAddress, ...]:
    tables = _convert(value, list[_NodeTable], "kamailio")
    nodes = []
    for index, t in enumerate(tables):
        key = f"kamailio[{index}]"
        evapi_host, evapi_port = parse_hostport(t.evapi, f"{key}.evapi")
        sip_host, sip_port = evapi_host, DEFAULT_SIP_PORT
        if t.sip:
            sip_host, sip_port = parse_hostport(t.sip, f"{key}.sip", DEFAULT_SIP_PORT)
        nodes.append(_node(t.name or f"{evapi_host}:{evapi_port}", evapi_host, evapi_port, sip_host, sip_port, key))
    return _unique(tuple(nodes))


def _dec_hook(kind: type, obj: object) -> object:
    if kind is Path and isinstance(obj, str) and obj:
        return Path(obj)
    raise NotImplementedError


def _enc_hook(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError


T = TypeVar("T")


def _convert(data: object, kind: type[T], prefix: str = "", names: Mapping[str, str] | None = None) -> T:
    """``data`` checked into ``kind``; a problem becomes a ConfigError that
    names the key (or the flag it came from, per ``names``)."""
    try:
        return msgspec.convert(data, kind, dec_hook=_dec_hook, strict=False)
    except msgspec.ValidationError as exc:
        found = read_problem(str(exc))
        problem, path = found.text, found.path
        # Problems with one field of a table name it in the message.
        if found.field is not None:
            path, problem = [*path, found.field], "unknown key" if found.kind == "unknown_field" else "is required"
        elif (field := re.match(r"(\w+): ", problem)) is not None:  # a check across fields
            path, problem = [*path, field.group(1)], problem[field.end() :]
        else:
            value = _value_at(data, path)
            if isinstance(value, float) and not math.isfinite(value):
                problem = f"must be a finite number, not {value}"
        key = ".".join([prefix, *path] if prefix else path) or "settings"
        raise ConfigError((names or {}).get(key, key), problem[:1].lower() + problem[1:]) from None


def _value_at(data: object, path: list[str]) -> object:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_regular(path, _MAX_SETTINGS).decode("utf-8"))
    except FileProblem as exc:
        raise ConfigError(str(path), exc.problem) from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def config_from(data: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Config:
    """A :class:`Config` from a settings file's data; ``names`` maps keys
    set from flags to the flags, for the error messages."""
    data = dict(data)
    nodes = _nodes(data.pop("kamailio", []))
    metrics_text = data.pop("metrics", DEFAULT_METRICS)
    if not isinstance(metrics_text, str):
        raise ConfigError((names or {}).get("metrics", "metrics"), 'must be "HOST:PORT" or "off"')
    metrics = parse_metrics(metrics_text, (names or {}).get("metrics", "metrics"))
    _moved(data)
    config = _convert(data, Config, names=names)
    _check_push(config, names or {})
    return msgspec.structs.replace(config, nodes=nodes, metrics=metrics)


def _moved(data: Mapping[str, Any]) -> None:
    """Keys that became one setting, named where they went."""
    push = data.get("push")
    if not isinstance(push, dict):
        return
    for table, key in (("apns", "expiration"), ("fcm", "ttl")):
        section = push.get(table)
        if isinstance(section, dict) and key in section:
            raise ConfigError(
                f"push.{table}.{key}", "replaced by push.expiration (one setting for APNs, FCM and pushed devices)"
            )


def _check_push(config: Config, names: Mapping[str, str]) -> None:
    """A push this worker sends must arrive, and its device's REGISTER be
    answered, while the worker still remembers the call: pushes are sent
    up to give_up_after from the call's start, may be delivered expiration
    later, and answered a window after that; the worker remembers a call
    ring_timeout from its start at least."""
    push, engine = config.push, config.engine
    if push.apns is None and push.fcm is None:
        return
    needs = push.give_up_after + push.expiration + engine.window
    if needs > engine.ring_timeout:
        key = "push.expiration"
        raise ConfigError(
            names.get(key, key),
            f"a push sent up to {push.give_up_after:g} s into a call (push.give_up_after), delivered "
            f"{push.expiration} s later and answered within the window ({engine.window:g} s) comes "
            f"{needs:g} s after the call's start, past engine.ring_timeout ({engine.ring_timeout:g} s), "
            "when the worker may have forgotten the call: lower one of them or raise engine.ring_timeout",
        )


def load_config(path: Path | None) -> Config:
    """Read a TOML file into :class:`Config` (defaults when ``path`` is None)."""
    return config_from(read_toml(path) if path is not None else {})


def with_changes(settings: T, changes: Mapping[str, Any], prefix: str, names: Mapping[str, str] | None = None) -> T:
    """``settings`` (a settings class) with ``changes`` checked by its own
    rules, as if they had been in its table."""
    data = msgspec.to_builtins(settings, enc_hook=_enc_hook)
    assert isinstance(data, dict)
    return _convert({**data, **changes}, type(settings), prefix, names)


def _unique(nodes: tuple[NodeAddress, ...]) -> tuple[NodeAddress, ...]:
    names = [n.name for n in nodes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("kamailio", f"node name {name!r} is used twice")
    return nodes


def with_nodes(config: Config, nodes: tuple[NodeAddress, ...]) -> Config:
    """The config with the nodes given on the command line."""
    return msgspec.structs.replace(config, nodes=_unique(nodes))
