"""The worker service: wires connections, protocol, dispatch, liveness,
state on disk and metrics.

Frames arrive from each node's connection and are handled synchronously:
protocol.py says what each means and what it leads to; the service counts,
captures, journals and dispatches that. Nothing on that path awaits, so the
readers never stop reading. Actions run as their
own tasks (dispatch.py); a timer task feeds the engine the passage of time;
health.py judges the nodes by their pings; persistence.py keeps the state
on disk.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Final

import trio

from .capture import CaptureWriter, ClockNote, PushNote
from .config import Config
from .core.clocks import PAUSED, NodeClocks
from .core.commands import Claim, Command, command_name
from .core.devices import device_id
from .core.engine import Act, Decision, Engine
from .core.events import (
    TYPE_NAMES,
    ClaimReply,
    CommandResult,
    RefusedReason,
    Register,
    event_type,
)
from .core.links import CommandFailed
from .core.netstring import FramingFault
from .core.protocol import Acknowledged, ClaimNotUsed, Decided, Protocol, Rejected, SipRefused, Skipped, decisions_of
from .core.push_book import PushBook, PushJob, Refusal
from .core.sequence import SequenceTracker
from .dispatch import Dispatcher
from .evapi_client import ConnectionState, EvapiConnection
from .fake_calls import ActionRunner
from .health import Liveness
from .http_server import serve_http
from .logs import AccountTally, Throttle, kv
from .metrics import Metrics
from .persistence import MAX_JOURNALS, StateKeeper, StateStore
from .pusher import Pusher, push_clients
from .redis_client import Lost
from .shared_claims import SharedClaims
from .sipp_runner import SippRunner, remove_stale_folders
from .stream_source import StreamSource

__all__ = ["Service"]

log = logging.getLogger("evapi_worker.service")

# How often lost-sequence gaps and gauges are looked at when nothing else
# wakes the timer.
_HOUSEKEEPING = 0.5
# Lost events are counted at once but logged at most this often per node: a
# node dropping events under load would otherwise log a line per gap.
_LOST_LOG_EVERY = 1.0
# What the app behind a refused push device gets wrong (docs/configuration.md, "The push").
_REFUSAL_HINTS: Final = {
    Refusal.PROVIDER: "pn-provider must be apns, apns.dev or fcm",
    Refusal.TOKEN: "pn-prid must be the device's token (APNs: hex digits, the VoIP one marked :voip)",
    Refusal.TOPIC: "pn-param must be TEAMID.BUNDLE.voip (or .remote&voip)",
}


def _holder(config: Config) -> str:
    """This worker's name in shared claims: stable across its restarts while
    its state file is (a retry after a crash finds its own claim)."""
    if config.state_file is not None:
        return f"{socket.gethostname()}:{config.state_file.resolve()}"
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Service:
    """One worker: ``await service.run()`` inside a nursery, or ``nursery.start``."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.engine = Engine(config.engine)
        self.runner = SippRunner(config.sipp)
        self.connections = {
            node.name: EvapiConnection(
                node,
                self.on_frame,
                backoff=config.evapi.backoff,
                max_frame=config.evapi.max_frame,
                on_state=self._on_connection_state,
                on_bad_frame=self._on_bad_frame,
                on_shed=self._on_shed,
                shed_above=config.evapi.shed_above,
                shed_below=config.evapi.shed_below,
            )
            for node in config.nodes
        }
        self.actions = ActionRunner(
            self.runner,
            {node.name: node for node in config.nodes},
            self.send_command,
            self.metrics,
            pin_ttl=config.evapi.pin_ttl,
            # A claim outlives every decision any worker may still make on
            # the pair: the window, the settle delay and the deadline.
            claim_ttl=max(
                config.evapi.pin_ttl, math.ceil(config.engine.window + config.engine.settle + config.engine.deadline)
            ),
        )
        self.dispatcher = Dispatcher(self.actions, self.connections, self.metrics, config.action_queue)
        # With [redis], events come from the nodes' streams; evapi carries
        # the commands (and events too, from a node without EVW_REDIS).
        redis = config.redis.target if config.redis is not None else None
        self.source = (
            StreamSource(
                redis, [node.name for node in config.nodes], self.on_entry,
                backoff=config.evapi.backoff, on_connected=self._on_redis, on_skipped=self._on_entry_skipped,
                on_lost=partial(self._on_redis_lost, "stream"), max_payload=config.evapi.max_frame,
            )
            if redis is not None
            else None
        )  # fmt: skip
        self.shared_claims = (
            SharedClaims(
                redis, _holder(config), backoff=config.evapi.backoff, on_lost=partial(self._on_redis_lost, "claims")
            )
            if redis is not None
            else None
        )
        self.actions.shared_claims = self.shared_claims
        self.clocks = NodeClocks(wall_offset=0.0)  # set when running
        self.push_book = PushBook(config.push.max_devices, config.push.max_devices_per_account)
        self.protocol = Protocol(self.engine, self.clocks, self.push_book, SequenceTracker(config.evapi.sequence_grace))
        clients = push_clients(config.push)
        self.pusher = (
            Pusher(
                clients, self.push_book, self.metrics, self.engine.ringing, self._claim_push,
                limit=config.push.max_in_flight, per_account=config.push.max_in_flight_per_account,
                rate_per_account=config.push.rate_per_account,
                give_up_after=config.push.give_up_after, on_sent=self._note_push,
            )
            if clients
            else None
        )  # fmt: skip
        self.liveness = Liveness(
            self.connections, self.send_command, self.metrics, config.evapi.ping_interval, self._on_ping,
            answers_read=self.source.positioned if self.source is not None else None,
        )  # fmt: skip
        self._wake = trio.Event()
        self._timer_at = math.inf
        self._evictions = AccountTally(_LOST_LOG_EVERY)  # by table: what was not logged yet
        self._refusals = AccountTally(_LOST_LOG_EVERY)  # by reason
        self._lost_unlogged: dict[str, tuple[int, int]] = {}  # node -> (events, gaps) not yet logged
        self._lost_logged_at = -math.inf
        self._throttle: Throttle[tuple[int, str, str, str]] = Throttle()
        self.metrics_port: int | None = None  # bound port of /metrics, once listening
        self.capture = (
            CaptureWriter(config.capture, on_error=self._on_capture_error) if config.capture is not None else None
        )
        self.store: StateStore | None = None  # made when running (it needs the clock)
        self.keeper: StateKeeper | None = None  # the journal and snapshot tasks, with the store
        self._restored_actions: tuple[list[Act], list[Act]] = ([], [])  # to begin, to retry
        self._intake = trio.CancelScope()
        self._intake_ended: trio.Event | None = None  # made as the intake starts
        # Captures store wall-clock receive times; the service runs on trio's clock.
        self._wall_offset = 0.0  # set when running
        # Observers of every decision (replay output, tests); called synchronously.
        self.decision_listeners = self.dispatcher.listeners
        m = self.metrics
        m.sipp_running.set_function(lambda: self.runner.running)
        m.sipp_waiting.set_function(lambda: self.runner.waiting)
        m.sipp_processes.set_function(lambda: self.runner.processes)
        m.tracked_calls.set_function(lambda: self.engine.call_count)
        m.tracked_devices.set_function(lambda: self.engine.device_count)
        m.push_devices.set_function(lambda: self.push_book.device_count)
        m.init_series([node.name for node in config.nodes], redis=self.source is not None)

    # -- running -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._wall_offset = time.time() - trio.current_time()
        self.clocks.wall_offset = self._wall_offset
        if self.config.state_file is not None:
            self.store = StateStore(
                self.config.state_file, self._wall_offset, self._on_state_error, self._on_journal_dropped
            )
            self.keeper = StateKeeper(
                self.store, self.engine, self.push_book, self.config.state_interval, self.actions.waiting
            )
            self.actions.on_begin = self.keeper.action_begins
        stale = remove_stale_folders()
        if stale:
            log.info("stale SIPp folders removed %s", kv(count=stale))
        self._load_state()
        try:
            async with trio.open_nursery() as nursery:
                if self.capture is not None:
                    await nursery.start(self.capture.run)
                if self.config.metrics is not None:
                    host, port = self.config.metrics
                    self.metrics_port = await nursery.start(serve_http, host, port, self.metrics.registry, self.healthy)
                await nursery.start(self.runner.serve)
                if self.shared_claims is not None:
                    await nursery.start(self.shared_claims.run)
                self.dispatcher.open(nursery)
                if self.pusher is not None:
                    await nursery.start(self.pusher.run)
                self.dispatcher.resume(*self._restored_actions)
                self._restored_actions = ([], [])
                await nursery.start(self._run_intake)
                if self.keeper is not None:
                    nursery.start_soon(self.keeper.run)
                task_status.started()
        finally:
            if self.store is not None:
                self.store.close()

    async def _run_intake(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The evapi connections and the engine's timer: what :meth:`stop` ends first."""
        self._intake_ended = trio.Event()
        try:
            with self._intake:
                async with trio.open_nursery() as nursery:
                    for conn in self.connections.values():
                        await nursery.start(conn.run)
                        nursery.start_soon(self.liveness.watch, conn)
                    if self.source is not None:
                        await nursery.start(self.source.run)
                    nursery.start_soon(self._timer)
                    task_status.started()
        finally:
            self._intake_ended.set()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: begin no more actions, give those begun up to
        ``grace`` seconds to finish, then stop taking events and save the
        state with the actions that have not begun (they begin after a
        restart). The caller then cancels :meth:`run`, which kills any SIPp
        still running.

        The connections stay open through the grace: a running fake call
        still needs its pin acknowledged, and the events that come
        meanwhile still update the state (what they decide is deferred)."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.dispatcher.close()
        self.actions.close()
        log.info("stopping %s", kv(running=self.actions.begun, waiting=len(self.actions.waiting()), grace=grace))
        with trio.move_on_after(grace):
            await self.actions.wait_begun()
        self._intake.cancel()
        if self._intake_ended is not None:
            await self._intake_ended.wait()  # no event handled after the state is taken
        self._log_lost(math.inf)
        deferred = self.actions.waiting()
        if self.store is not None and self.keeper is not None and await self.keeper.save(deferred):
            log.info(
                "state saved %s",
                kv(path=str(self.store.path), calls=self.engine.call_count, devices=self.engine.device_count,
                   deferred=len(deferred)),
            )  # fmt: skip

    # -- state on disk ----------------------------------------------------

    def _load_state(self) -> None:
        store = self.store
        if store is None:
            return
        restored = store.restore(self.engine, trio.current_time(), self._restore_frame, self.push_book, self.clocks)
        if restored.snapshot_error is not None:
            # Keep the file aside for a look (it would fail again at every
            # start); what the journals hold is restored all the same.
            try:
                kept = str(store.set_aside())
            except OSError as move:
                kept = str(store.path)
                log.warning("state file not moved aside %s", kv(path=kept, error=str(move)))
            log.warning("snapshot not restored %s", kv(error=restored.snapshot_error, kept=kept))
            self.metrics.state_skipped.labels("snapshot").inc()
        self._restored_actions = (restored.deferred, restored.in_doubt)
        if self.source is not None:
            # Read on from the last entry handled before the restart.
            self.source.positions.update(
                {node: entry for node, entry in restored.positions.items() if node in self.source.nodes}
            )
        for problem in restored.problems:
            log.warning("journal not restored %s", kv(error=problem))
        if restored.skipped or restored.dropped:
            self.metrics.state_skipped.labels("journal").inc(restored.skipped)
            self.metrics.state_skipped.labels("snapshot").inc(restored.dropped)
            log.warning(
                "state damaged %s",
                kv(path=str(store.path), journal_skipped=restored.skipped, snapshot_dropped=restored.dropped),
            )
        log.info(
            "state restored %s",
            kv(path=str(store.path), calls=self.engine.call_count, devices=self.engine.device_count,
               snapshot_calls=restored.calls, journal_events=restored.events,
               actions_begun=restored.actions_begun, to_begin=len(restored.deferred),
               to_retry=len(restored.in_doubt),
               skipped=restored.skipped),
        )  # fmt: skip

    def _restore_frame(self, node: str, payload: bytes, now: float) -> Sequence[Decision]:
        """A journaled event, fed again; what it decides the store keeps, to
        begin what never began. Its pushes are not sent: that call is gone."""
        return decisions_of(self.protocol.restore(node, payload, now))

    def _journal_soon(self) -> None:
        if self.keeper is not None:
            self.keeper.soon()

    def _on_state_error(self, file: str, exc: OSError) -> None:
        # Called from the writer thread too: a counter and a log line only.
        self.metrics.state_errors.labels(file).inc()
        log.error("state not written %s", kv(file=file, error=str(exc)))

    def _on_journal_dropped(self, path: Path, size: int) -> None:
        # Snapshots fail (the error is counted there): the journals stay
        # within their bound, what the oldest held is lost.
        self.metrics.state_dropped.inc(size)
        log.error("journal dropped %s", kv(path=str(path), bytes=size, bound=MAX_JOURNALS))

    async def _timer(self) -> None:
        while True:
            deadline = self.protocol.next_deadline()
            self._timer_at = min(deadline if deadline is not None else math.inf, trio.current_time() + _HOUSEKEEPING)
            with trio.move_on_at(self._timer_at):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            paused = now - self._timer_at
            if paused >= PAUSED:
                # Counted, logged, and not ageing the open sequence gaps:
                # their events may be waiting unread in a socket.
                self.protocol.paused(paused)
                self.metrics.paused.inc(paused)
                if paused >= 1.0:  # a busy loop's fraction of a second is not news
                    log.warning("worker paused %s", kv(seconds=round(paused, 3)))
            self.dispatcher.dispatch(self.protocol.tick(now), now)
            for node, lost in self.protocol.expire(now):
                self._count_lost(node, lost)
            self._log_lost(now)
            self._say_unsaid(now)
            self._count_evictions(now)
            self._count_refusals(now)

    # -- input ---------------------------------------------------------

    def on_frame(self, node: str, payload: bytes, now: float) -> None:
        """Handle one frame from ``node`` received at ``now``. Never raises."""
        got = self.protocol.receive(node, payload, now)
        m = self.metrics
        match got:
            case Skipped(error) | Rejected(error):
                m.event_errors.labels(node, error.reason).inc()
                if type(got) is Skipped:
                    self._say(logging.INFO, "event skipped", node, error.reason, now, detail=error.detail)
                else:
                    self._say(
                        logging.WARNING, "event rejected", node, error.reason, now,
                        detail=error.detail, payload=payload[:200].decode("utf-8", "replace"),
                    )  # fmt: skip
                self._capture(node, None, payload, now)
                return
        event = got.event
        if self.capture is not None:
            self._capture(node, event.seq, payload, now)
        # Counted inline: the one thing done for every event (metrics.EventCounter).
        etype = TYPE_NAMES[type(event)]
        counts = m.events.counts
        counts[node, etype] = counts.get((node, etype), 0) + 1
        if got.unknown_fields:
            m.unknown_fields.labels(node, etype).inc(len(got.unknown_fields))
            log.debug("unknown fields %s", kv(node=node, type=etype, fields=",".join(got.unknown_fields)))
        if got.lost:
            self._count_lost(node, got.lost)
        if got.named is not None:
            self._say(
                logging.WARNING, "node name differs", node, "node_name", now, event_node=got.named,
                hint=f"name this node {got.named} (its EVW_NODE) in --kamailio or [[kamailio]]",
            )  # fmt: skip
        match got:
            case Decided():
                self._decided(node, got, payload, now)
            case Acknowledged(result):
                conn = self.connections.get(node)
                if conn is None or not conn.resolve(result):
                    log.debug("acknowledgement for no waiting command %s", kv(node=node, id=result.id))
            case ClaimNotUsed(unused):
                m.claims_unused.labels(node).inc()
                log.warning("claim unused %s", kv(node=node, claim=unused.claim))
            case SipRefused(refused):
                label = refused.label  # a reason this version does not know is "other": no label from the wire
                m.sip_refused.labels(node, label).inc()
                detail = {"said": refused.reason} if label is RefusedReason.OTHER else {}
                self._say(
                    logging.WARNING, "sip request refused", node, label, now, src=refused.src_ip,
                    account=refused.aor, **detail,
                )  # fmt: skip

    def _decided(self, node: str, got: Decided, payload: bytes, now: float) -> None:
        """An event the engine took: its pushes, its journal entry, its decisions."""
        event, m = got.event, self.metrics
        if got.pushes and self.pusher is not None:
            self.pusher.submit(got.pushes)
        if isinstance(event, Register):
            if self.pusher is not None and event.expires:
                woke = self.pusher.woke(event.aor, device_id(event), now)
                if woke is not None:
                    m.push_wakeup.observe(woke)
        elif got.lost_end_ignored:
            m.lost_ends_ignored.labels(node).inc()
            self._say(
                logging.WARNING, "lost call end ignored", node, event_type(event), now,
                call_id=getattr(event, "call_id", ""),
            )  # fmt: skip
        if self.store is not None:
            self.store.note_event(node, now, payload)
            if isinstance(event, Register):
                # Journaled at once, not at the next interval: a crash
                # soon after loses no late REGISTER. (Before any action
                # it led to begins in any case: see StateKeeper.action_begins.)
                self._journal_soon()
        if got.decisions:
            self.dispatcher.dispatch(got.decisions, now)
        deadline = self.protocol.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._wake.set()

    def on_entry(self, node: str, entry_id: str, payload: bytes, now: float) -> None:
        """An entry of ``node``'s Redis stream: a frame like evapi's, and
        the stream's position (journaled with the events before it)."""
        self.on_frame(node, payload, now)
        if self.store is not None:
            self.store.note_position(node, entry_id)
        conn = self.connections.get(node)
        if conn is not None:
            # The node talks through its stream (evapi brings it nothing):
            # a ping answered late behind a backlog is no dead node.
            conn.last_data = now

    def healthy(self) -> tuple[bool, list[str]]:
        """For ``/healthz``: every node connected and answering and, with
        [redis], the streams read; else what is not."""
        ok, down = self.liveness.healthy()
        if self.source is not None and not self.source.connected:
            return False, [*down, "redis"]
        return ok, down

    def _on_redis(self, connected: bool) -> None:
        self.metrics.redis_connected.set(1 if connected else 0)
        if connected:
            self.metrics.redis_connects.inc()

    def _on_redis_lost(self, connection: str, why: Lost) -> None:
        self.metrics.redis_lost.labels(connection, why).inc()

    def _on_entry_skipped(self, node: str, entry_id: str, size: int, now: float) -> None:
        """A stream entry too large to be an event: counted as evapi's
        oversized frames are, and its position kept (never read again)."""
        self.metrics.event_errors.labels(node, FramingFault.OVERSIZED).inc()
        reason = FramingFault.OVERSIZED
        self._say(logging.WARNING, "stream entry skipped", node, reason, now, entry=entry_id, bytes=size)
        if self.store is not None:
            self.store.note_position(node, entry_id)

    def _capture(self, node: str, seq: int | None, payload: bytes, now: float) -> None:
        if self.capture is not None:
            self._captured(self.capture.record(node, seq, now + self._wall_offset, payload))

    def _note_push(self, job: PushJob, now: float) -> None:
        """A push was accepted: its device's REGISTER answers it until the
        provider stops trying to deliver it, and a window more."""
        lasts = self.config.push.expiration
        self.engine.pushed(job.call_id, job.aor, job.device, lasts, now)
        if self.store is not None:
            self.store.note_push(job.call_id, job.aor, job.device, lasts, now)
            self._journal_soon()
        if self.capture is not None:
            note = PushNote(now + self._wall_offset, job.call_id, job.device, job.provider, job.aor, lasts)
            self._captured(self.capture.note_push(note))

    def _on_ping(self, node: str, sent: float, received: float, ts: float) -> None:
        """A ping's answer measured ``node``'s clock: when the measurement
        is the one used now, the journal and the capture keep it, so a
        restore and a replay place the node's REGISTERs as this worker does."""
        measured = self.protocol.ping(node, sent, received, ts)
        if measured is None:
            return
        if self.store is not None:
            self.store.note_clock(node, measured.offset, measured.uncertainty, measured.at)
        if self.capture is not None:
            wall = self._wall_offset
            note = ClockNote(measured.at + wall, node, measured.offset - wall, measured.uncertainty)
            self._captured(self.capture.note_clock(note))

    def _captured(self, queued: bool) -> None:
        (self.metrics.capture_records if queued else self.metrics.capture_dropped).inc()

    # -- commands and connection state ----------------------------------

    async def _claim_push(self, node: str, claim: str) -> bool:
        """Whether this worker sends a push: the node's claim (every worker
        asks the node the call is on; the first wins)."""
        if node not in self.connections:
            return True  # a node this worker does not know: no one to ask
        try:
            result = await self.send_command(node, Claim(claim=claim, claim_ttl=self.config.evapi.pin_ttl * 4))
        except CommandFailed as exc:
            log.warning("push not claimed %s", kv(node=node, reason=exc.reason, detail=str(exc)))
            return False
        return result.claim is ClaimReply.WON

    async def send_command(self, node: str, command: Command) -> CommandResult:
        """Send a command to a node and wait for its acknowledgement."""
        name = command_name(command)
        m = self.metrics
        m.commands.labels(node, name).inc()
        try:
            result = await self.connections[node].send_command(command, self.config.evapi.ack_timeout)
        except CommandFailed as exc:
            m.commands_failed.labels(node, name, exc.reason).inc()
            raise
        m.commands_acked.labels(node, name).inc()
        return result

    def _on_connection_state(self, node: str, state: ConnectionState) -> None:
        self.liveness.on_state(node, state)

    def _on_capture_error(self, records: int, exc: OSError) -> None:
        self.metrics.capture_lost.inc(records)

    def _on_shed(self, node: str, payload: bytes, now: float) -> None:
        """A frame dropped under overload: counted, captured, its sequence
        number noted (it is shed, not lost), nothing decided."""
        self.metrics.events_shed.labels(node).inc()
        self._capture(node, None, payload, now)
        lost = self.protocol.shed(node, payload, now)
        if lost:
            self._count_lost(node, lost)

    def _on_bad_frame(self, node: str, reason: FramingFault, detail: str) -> None:
        self.metrics.event_errors.labels(node, reason).inc()
        if reason is FramingFault.OVERSIZED:
            # Lost framing is logged by the connection, which reconnects.
            self._say(logging.WARNING, "evapi frame skipped", node, reason, trio.current_time(), detail=detail)

    def _say(self, level: int, what: str, node: str, reason: str, now: float, **detail: object) -> None:
        """Log rejected input at most once per (what, node, reason) and
        second; the line counts what it stands for (the rest comes from
        :meth:`_say_unsaid`)."""
        count = self._throttle.note((level, what, node, reason), now)
        if count:
            log.log(level, "%s %s", what, kv(node=node, reason=reason, count=count, **detail))

    def _say_unsaid(self, now: float) -> None:
        for (level, what, node, reason), count in self._throttle.due(now):
            log.log(level, "%s %s", what, kv(node=node, reason=reason, count=count))

    def _count_lost(self, node: str, lost: int) -> None:
        self.metrics.events_lost.labels(node).inc(lost)
        events, gaps = self._lost_unlogged.get(node, (0, 0))
        self._lost_unlogged[node] = (events + lost, gaps + 1)

    def _log_lost(self, now: float) -> None:
        if not self._lost_unlogged or now < self._lost_logged_at + _LOST_LOG_EVERY:
            return
        for node, (events, gaps) in self._lost_unlogged.items():
            log.warning("events lost %s", kv(node=node, count=events, gaps=gaps))
        self._lost_unlogged.clear()
        self._lost_logged_at = now

    def _count_refusals(self, now: float) -> None:
        """Count the REGISTERs whose push parameters name no device this
        worker can push, and log them: a line per reason and second at most,
        naming the accounts (the app to fix is theirs)."""
        for (refusal, account), count in self.push_book.take_refusals().items():
            self.metrics.push_devices_refused.labels(refusal.value).inc(count)
            self._refusals.add(refusal.value, account, count)
        for why, fields in self._refusals.due(now):
            log.warning("push device refused %s", kv(reason=why, hint=_REFUSAL_HINTS[Refusal(why)], **fields))

    def _count_evictions(self, now: float) -> None:
        """Count what the engine and the push book dropped to stay in their
        bounds, and log it: a line per table and second at most, naming
        the accounts (the one whose flood it was pays for it)."""
        evicted = self.engine.take_evictions()
        for account, count in self.push_book.take_evictions().items():
            evicted[("push_devices", account)] = count
        for (table, account), count in evicted.items():
            self.metrics.evictions.labels(table).inc(count)
            self._evictions.add(table, account, count)
        for table, fields in self._evictions.due(now):
            log.warning("state evicted %s", kv(table=table, **fields))
