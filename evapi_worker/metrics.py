"""Prometheus metrics, on a registry owned by one service instance.

Nothing is registered on prometheus_client's global registry, so tests and
replays can build as many services as they like.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .core.commands import COMMAND_NAMES
from .core.engine import Action, EndKind, Reason
from .core.events import EVENT_TYPES, ClaimReply, EventErrorReason, RefusedReason
from .core.links import CommandFailure
from .core.netstring import FramingFault
from .core.outcomes import Outcome
from .core.push_answers import PushOutcome
from .core.push_book import Refusal
from .redis_client import Lost
from .shared_claims import ClaimResult

__all__ = [
    "COMMANDS",
    "COMMAND_FAILURES",
    "DECISIONS",
    "EVENT_ERROR_REASONS",
    "EVICTION_TABLES",
    "PUSH_PROVIDERS",
    "PUSH_RESULTS",
    "SHARED_CLAIM_RESULTS",
    "Metrics",
]

# Every label value comes from the enum that makes it.
EVENT_ERROR_REASONS: tuple[str, ...] = tuple(EventErrorReason) + tuple(
    f for f in FramingFault if f is not FramingFault.BROKEN
)
COMMANDS = COMMAND_NAMES
# The tables kept within bounds: the engine's calls, devices and the
# contacts it remembers, and the push book.
EVICTION_TABLES = ("calls", "devices", "contacts", "push_devices", "pushed")
SIP_REFUSED_REASONS: tuple[str, ...] = tuple(RefusedReason)
PUSH_PROVIDERS = ("apns", "apns.dev", "fcm")
PUSH_RESULTS: tuple[str, ...] = tuple(PushOutcome)
COMMAND_FAILURES: tuple[str, ...] = tuple(CommandFailure)
SHARED_CLAIM_RESULTS: tuple[str, ...] = tuple(ClaimResult)
_ENDS = tuple(dict.fromkeys(kind.reason for kind in EndKind))
DECISIONS = tuple((a.value, str(r)) for a in Action if a is not Action.NONE for r in _ENDS) + tuple(
    (Action.NONE.value, str(r)) for r in Reason if r not in _ENDS
)

_DELAY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SIPP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)


class EventCounter(Collector):
    """``evapi_worker_events_total{node,type}`` as plain integers.

    Counted once per event, on the hot path: a dict increment instead of a
    prometheus Counter's lock and checks (a tenth of the ingest budget).
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.counts: dict[tuple[str, str], int] = {}

    def init(self, node: str, etype: str) -> None:
        """Export a zero for a series that has not happened yet."""
        self.counts.setdefault((node, etype), 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["node", "type"])
        for (node, etype), count in list(self.counts.items()):
            family.add_metric([node, etype], count)
        yield family


class Metrics:
    """Every metric the worker exports (prefix ``evapi_worker_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        p = "evapi_worker_"
        self.build_info = Info(p + "build", "Version of the running worker.", registry=r)
        self.build_info.info({"version": __version__})
        self.events = EventCounter(p + "events", "Events received from Kamailio.")
        r.register(self.events)
        self.event_errors = Counter(
            p + "event_errors", "Frames that were not valid events, by reason.", ["node", "reason"], registry=r
        )
        self.unknown_fields = Counter(
            p + "unknown_fields", "Event fields this version does not know (ignored).", ["node", "type"], registry=r
        )
        self.decisions = Counter(
            p + "decisions", "Decisions about (call, device) pairs.", ["action", "reason"], registry=r
        )
        self.late_registrations = Counter(
            p + "late_registrations",
            "Push devices that registered after the call ended, within the window, by how it ended.",
            ["ended"],
            registry=r,
        )
        self.fake_calls = Counter(p + "fake_calls", "Fake calls by outcome.", ["outcome"], registry=r)
        self.state_errors = Counter(
            p + "state_errors", "State writes that failed, by file (snapshot, journal).", ["file"], registry=r
        )
        self.state_dropped = Counter(
            p + "state_dropped_bytes",
            "Journal bytes removed to keep the journals within their bound while snapshots failed.",
            registry=r,
        )
        self.state_skipped = Counter(
            p + "state_skipped",
            "State found damaged at start and skipped: a snapshot set aside, journal records or values.",
            ["file"],
            registry=r,
        )
        self.fake_calls_sent = Counter(
            p + "fake_calls_sent", "Fake calls whose SIPp run started (the pin was acknowledged).", registry=r
        )
        self.messages = Counter(p + "messages", "MESSAGE notifications by outcome.", ["outcome"], registry=r)
        self.sipp_duration = Histogram(
            p + "sipp_duration_seconds",
            "Wall time of one fake call in SIPp (INVITE to its end).",
            buckets=_SIPP_BUCKETS,
            registry=r,
        )
        self.pushes = Counter(
            p + "pushes",
            "Pushes by provider and result: sent, unregistered, bad_token, auth, failed, gave_up, "
            "ended (the call ended first), taken (another worker sent it), dropped, not_configured.",
            ["provider", "result"],
            registry=r,
        )
        self.push_retries = Counter(p + "push_retries", "Pushes tried again.", ["provider"], registry=r)
        self.push_latency = Histogram(
            p + "push_latency_seconds",
            "From the call_start event read to the provider's acceptance of its push.",
            ["provider"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.push_wakeup = Histogram(
            p + "push_wakeup_seconds",
            "From a push accepted to its device's REGISTER: how long phones take to wake.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.push_devices = Gauge(p + "push_devices", "Push devices known, to push when a call starts.", registry=r)
        self.push_devices_refused = Counter(
            p + "push_devices_refused",
            "REGISTERs whose push parameters name no device the worker can push, by reason: provider "
            "(not apns, apns.dev or fcm), token (not a token of that provider), topic (pn-param names no VoIP topic).",
            ["reason"],
            registry=r,
        )
        self.redis_connected = Gauge(
            p + "redis_connected",
            "1 while the events' Redis stream is read, 0 while it is not (exported only with [redis]).",
            registry=r,
        )
        self.redis_connects = Counter(
            p + "redis_connects", "Connections made to read the events' Redis stream.", registry=r
        )
        self.redis_lost = Counter(
            p + "redis_lost",
            "Connections to Redis that ended or could not be made, by connection (stream, claims) and why.",
            ["connection", "why"],
            registry=r,
        )
        self.wakeup_delay = Histogram(
            p + "wakeup_delay_seconds",
            "From call start (the push) to the late REGISTER.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.late_after_end = Histogram(
            p + "late_after_end_seconds",
            "From the call's end to the late REGISTER.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.decision_latency = Histogram(
            p + "decision_latency_seconds",
            "From receiving the deciding event to starting the action.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.tracked_calls = Gauge(p + "tracked_calls", "Calls held in memory.", registry=r)
        self.tracked_devices = Gauge(p + "tracked_devices", "Push devices held in memory.", registry=r)
        self.evictions = Counter(
            p + "evictions",
            "State dropped (or not kept) to stay under its bounds, by table: calls, devices, contacts, push_devices, "
            "pushed (a call's pushed devices past 64: their deadline counts from the call's start).",
            ["table"],
            registry=r,
        )
        self.kamailio_up = Gauge(
            p + "kamailio_up", "1 while the evapi connection to a node is up.", ["node"], registry=r
        )
        self.reconnects = Counter(p + "reconnects", "evapi connections made after the first.", ["node"], registry=r)
        self.sip_refused = Counter(
            p + "sip_refused",
            "SIP data Kamailio refused or would not pass on (forged, or not carried intact), by reason.",
            ["node", "reason"],
            registry=r,
        )
        self.lost_ends_ignored = Counter(
            p + "lost_ends_ignored",
            "Call ends with no transaction on a node that still had the call (forged), ignored.",
            ["node"],
            registry=r,
        )
        self.events_lost = Counter(p + "events_lost", "Events missing from a node's sequence.", ["node"], registry=r)
        self.paused = Counter(
            p + "paused_seconds",
            "Seconds the worker did not run when it should have (stopped, swapped out, starved).",
            registry=r,
        )
        self.events_shed = Counter(
            p + "events_shed", "Events dropped unread because the worker fell behind (overload).", ["node"], registry=r
        )
        self.commands = Counter(p + "commands", "Commands sent to Kamailio.", ["node", "command"], registry=r)
        self.commands_acked = Counter(
            p + "commands_acked", "Commands Kamailio acknowledged.", ["node", "command"], registry=r
        )
        self.commands_failed = Counter(
            p + "commands_failed",
            "Commands refused, unanswered or not sent.",
            ["node", "command", "reason"],
            registry=r,
        )
        self.sipp_running = Gauge(p + "sipp_running", "Fake calls holding a slot (pinning or in SIPp).", registry=r)
        self.sipp_waiting = Gauge(p + "sipp_waiting", "Fake calls waiting for a slot.", registry=r)
        self.sipp_processes = Gauge(
            p + "sipp_processes", "SIPp processes running (each carries many fake calls).", registry=r
        )
        self.account_share_waits = Counter(
            p + "account_share_waits",
            "Fake calls that waited because their account held its share of the slots.",
            registry=r,
        )
        self.capture_records = Counter(
            p + "capture_records", "Frames (and push notes) queued for the capture file.", registry=r
        )
        self.capture_dropped = Counter(
            p + "capture_dropped", "Frames not captured because the disk was behind.", registry=r
        )
        self.capture_lost = Counter(
            p + "capture_lost", "Frames not captured because writing failed (disk full, folder gone).", registry=r
        )
        self.claims = Counter(
            p + "claims",
            "Fake calls (or MESSAGEs) claimed on a node: won (this worker sends it) or taken (another does).",
            ["node", "result"],
            registry=r,
        )
        self.shared_claims = Counter(
            p + "shared_claims",
            "Fake calls (or MESSAGEs) claimed in Redis, shared by every node: won, taken, or unavailable "
            "(Redis out of reach: the node's claim decides).",
            ["result"],
            registry=r,
        )
        self.claims_unused = Counter(
            p + "claims_unused",
            "Won claims whose fake call never came (a worker died between claiming and calling), told by the node.",
            ["node"],
            registry=r,
        )
        self.dispatch_dropped = Counter(
            p + "dispatch_dropped", "Actions dropped because the action queue was full.", registry=r
        )

    def init_series(self, nodes: Sequence[str], *, redis: bool = False) -> None:
        """Create every labelled series at zero, so dashboards and alerts see
        0 rather than nothing before the first occurrence. Without ``redis``
        the Redis series are not exported: a 0 would read as Redis down."""
        if not redis:
            for unused in (self.redis_connected, self.redis_connects, self.redis_lost):
                self.registry.unregister(unused)
        else:
            for connection in ("stream", "claims"):
                for why in Lost:
                    self.redis_lost.labels(connection, why)
        for node in nodes:
            for etype in EVENT_TYPES:
                self.events.init(node, etype)
                self.unknown_fields.labels(node, etype)
            for reason in EVENT_ERROR_REASONS:
                self.event_errors.labels(node, reason)
            self.reconnects.labels(node)
            self.events_lost.labels(node)
            self.events_shed.labels(node)
            self.kamailio_up.labels(node)
            self.claims_unused.labels(node)
            for refused in SIP_REFUSED_REASONS:
                self.sip_refused.labels(node, refused)
            for reply in ClaimReply:
                self.claims.labels(node, reply.value)
            for command in COMMANDS:
                self.commands.labels(node, command)
                self.commands_acked.labels(node, command)
                for reason in COMMAND_FAILURES:
                    self.commands_failed.labels(node, command, reason)
        for action, reason in DECISIONS:
            self.decisions.labels(action, reason)
        for kind in EndKind:
            self.late_registrations.labels(kind.value)
        for outcome in Outcome:
            self.fake_calls.labels(outcome.value)
            self.messages.labels(outcome.value)
        for table in EVICTION_TABLES:
            self.evictions.labels(table)
        for file in ("snapshot", "journal"):
            self.state_errors.labels(file)
            self.state_skipped.labels(file)
        for provider in PUSH_PROVIDERS:
            self.push_retries.labels(provider)
            self.push_latency.labels(provider)
            for result in PUSH_RESULTS:
                self.pushes.labels(provider, result)
        for claim in SHARED_CLAIM_RESULTS:
            self.shared_claims.labels(claim)
        for refusal in Refusal:
            self.push_devices_refused.labels(refusal.value)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value, 0.0 when it was never set (for tests and summaries)."""
        sample = self.registry.get_sample_value(name, labels or {})
        return 0.0 if sample is None else sample
