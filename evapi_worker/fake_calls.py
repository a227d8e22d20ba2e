"""Carry out the engine's actions: a fake call through SIPp, or a MESSAGE.

A fake call is: wait for a SIPp slot (no later than the decision's
deadline), pin the device's route on the node it registered on, then run
SIPp against that node. Every step that can fail says so in the outcome;
event data passes :mod:`sip_values` before it reaches SIPp or Kamailio.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from .core import sip_values
from .core.claims import claim_key
from .core.commands import Message, Pin
from .core.engine import Act, Action, CallInfo
from .core.events import ClaimReply, CommandResult, Register
from .core.links import CommandFailed, NodeAddress
from .core.outcomes import Outcome
from .core.sip_values import UnsafeValue
from .evapi_client import SendCommand
from .logs import kv
from .metrics import Metrics
from .shared_claims import ClaimResult, SharedClaims
from .sipp_runner import Reservation, RunResult, SippJob, SippRunner

__all__ = [
    "ActionRunner", "Parties", "PreparedCall", "build_job", "count_outcome", "device_route", "parties",
]  # fmt: skip

log = logging.getLogger("evapi_worker.actions")

_GOOD = frozenset((Outcome.COMPLETED, Outcome.ANSWERED, Outcome.REJECTED, Outcome.TAKEN, Outcome.DEFERRED))


def _what(act: Act) -> str:
    """The log message of an action's end."""
    return "message_done" if act.action is Action.MESSAGE else "fake_call_done"


def count_outcome(metrics: Metrics, act: Act, outcome: Outcome) -> None:
    """Count how an action ended: MESSAGEs apart from fake calls."""
    counter = metrics.messages if act.action is Action.MESSAGE else metrics.fake_calls
    counter.labels(outcome.value).inc()


@dataclass(frozen=True, slots=True)
class Parties:
    """Caller and callee of the original call, safe for SIP."""

    callee_user: str
    callee_domain: str
    caller_user: str
    caller_domain: str
    caller_name: str  # a quoted display name and a space, or ""
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PreparedCall:
    job: SippJob
    pin_key: str
    ruri: str
    dst: str
    warnings: tuple[str, ...]
    aor: str = ""  # the device's account, for Kamailio's registered-contact check


def parties(call: CallInfo, default_domain: str) -> Parties:
    """Check and encode who called whom; a bad display name is dropped."""
    callee_user, at, callee_domain = call.aor.rpartition("@")
    if not at:  # Kamailio without use_domain: the AOR is the user alone
        callee_user, callee_domain = call.aor, call.domain or default_domain
    warnings: list[str] = []
    name = ""
    if call.from_name:
        try:
            name = sip_values.display_name(call.from_name)
        except UnsafeValue as exc:
            warnings.append(str(exc))
    return Parties(
        callee_user=sip_values.sip_user("callee user", callee_user),
        callee_domain=sip_values.sip_host("callee domain", callee_domain),
        caller_user=sip_values.sip_user("from_user", call.from_user),
        caller_domain=sip_values.sip_host("from_domain", call.from_domain or callee_domain),
        caller_name=name,
        warnings=tuple(warnings),
    )


def device_route(reg: Register) -> str:
    """Where the device's REGISTER came from, as a SIP URI for ``$du``.

    Sending there (over the same TCP/TLS connection when there is one)
    reaches a device behind NAT, which its Contact alone may not.
    """
    host = sip_values.ip_host("src_ip", reg.src_ip)
    proto = reg.proto.lower()
    if proto not in ("udp", "tcp", "tls", "ws", "wss", "sctp"):
        raise UnsafeValue("proto", "is not a SIP transport")
    return f"sip:{host}:{reg.src_port};transport={proto}"


def build_job(decision: Act, node: NodeAddress, pin_key: str) -> PreparedCall:
    """Turn a fake-call decision into a SIPp job and the route to pin.

    Raises :class:`UnsafeValue` when a needed value cannot be made safe.
    """
    call, reg = decision.call, decision.register
    who = parties(call, node.sip_host)
    fields = (
        who.callee_user,
        who.callee_domain,
        who.caller_user,
        who.caller_domain,
        sip_values.token("pin", pin_key),
        sip_values.token("reason", decision.reason),
    )
    job = SippJob(
        call_id=sip_values.call_id(call.call_id),
        fields=fields,
        name=who.caller_name,
        remote_host=node.sip_host,
        remote_port=node.sip_port,
    )
    return PreparedCall(
        job, pin_key, sip_values.sip_uri("contact", reg.contact), device_route(reg), who.warnings, reg.aor
    )


class ActionRunner:
    """Runs decided actions; the caller starts one task per action."""

    def __init__(
        self,
        runner: SippRunner,
        nodes: Mapping[str, NodeAddress],
        send_command: SendCommand,
        metrics: Metrics,
        *,
        pin_ttl: int = 30,
        claim_ttl: int = 30,
    ) -> None:
        self.runner = runner
        self.nodes = nodes
        self.send_command = send_command
        self.metrics = metrics
        self.pin_ttl = pin_ttl
        self.claim_ttl = claim_ttl
        # Told how every action ended (the demo's narration, tests).
        self.outcome_listeners: list[Callable[[Act, Outcome], None]] = []
        # Awaited with the action as it begins, before anything of it
        # reaches Kamailio: the journal's record that it must not begin
        # again, on disk first.
        self.on_begin: Callable[[Act], Awaitable[None]] | None = None
        # With [redis]: claims shared by every node, made before the node's.
        self.shared_claims: SharedClaims | None = None
        # Actions that have not begun (no pin, no MESSAGE sent yet): what a
        # stopping worker saves to begin after its restart.
        self._not_begun: dict[int, Act] = {}
        # Those a stopping worker refused to begin: saved the same way.
        self._deferred: list[Act] = []
        self._keys = itertools.count()
        self._closed = False
        self._begun = 0  # begun and not ended
        self._ended = trio.Event()  # set when a begun action ends

    def close(self) -> None:
        """Begin no more actions: each not begun ends as ``deferred`` when it
        would begin (or once cancelled) and is listed by :meth:`waiting`;
        those begun run on (see :meth:`wait_begun`)."""
        self._closed = True

    def defer(self, act: Act) -> None:
        """An action decided while the worker stops: saved, never started."""
        self._deferred.append(act)
        self._done(act, _what(act), Outcome.DEFERRED, None, "the worker stops; saved for its restart")

    def waiting(self) -> list[Act]:
        """The actions decided and not begun: waiting for a SIPp slot, say,
        or deferred by a stopping worker (what its state keeps)."""
        return [*self._deferred, *self._not_begun.values()]

    @property
    def begun(self) -> int:
        """Actions past their point of no return and not ended yet."""
        return self._begun

    async def wait_begun(self) -> None:
        """Until no begun action is running (the caller bounds the wait)."""
        while self._begun:
            self._ended = trio.Event()
            await self._ended.wait()

    async def _begin(self, key: int) -> bool:
        """The point of no return of an action; False once closed."""
        if self._closed:
            return False
        act = self._not_begun.pop(key)
        self._begun += 1
        if self.on_begin is not None:
            await self.on_begin(act)
        return True

    async def run(self, decision: Act, received: float, *, retry: bool = False) -> Outcome:
        """Carry out one decision; ``received`` is when its event arrived;
        ``retry``: begun by this worker before a crash, end unknown (the
        node says whether it may go out, see :class:`~.commands.Pin`).
        Whatever goes wrong is this action's outcome (``failed``, logged
        with the error), never the service's end."""
        duration: float | None = None
        what = _what(decision)
        key = next(self._keys)
        self._not_begun[key] = decision
        outcome: Outcome | None = None
        try:
            if trio.current_time() > decision.deadline:
                # Decided from a REGISTER read late (a frozen or restarted
                # worker): the phone has stopped ringing.
                outcome, detail = Outcome.OVERDUE, "deadline passed before it began"
            elif decision.action is Action.MESSAGE:
                outcome, detail = await self._message(decision, received, key)
            else:
                outcome, result, detail = await self._fake_call(decision, received, key, retry)
                duration = result.duration if result else None
        except Exception as exc:  # the error boundary of one action
            log.exception("action failed %s", kv(call_id=decision.call_id, device=decision.device, error=repr(exc)))
            outcome, detail = Outcome.FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            begun = self._not_begun.pop(key, None) is None
            if begun:
                self._begun -= 1
                self._ended.set()
            elif outcome in (None, Outcome.DEFERRED):
                self._deferred.append(decision)  # the state keeps it; a restart begins it
            if outcome is None:
                # Cancelled: the worker stops. An action that had not begun
                # is saved by the caller and begins after a restart; one
                # that had is cut short.
                self._done(decision, what, Outcome.KILLED if begun else Outcome.DEFERRED, None, "the worker stopped")
        self._done(decision, what, outcome, duration, detail)
        return outcome

    def _done(self, decision: Act, what: str, outcome: Outcome, duration: float | None, detail: str) -> None:
        count_outcome(self.metrics, decision, outcome)
        fields = kv(
            node=decision.node,
            call_id=decision.call_id,
            account=decision.aor,
            device=decision.device,
            reason=decision.reason,
            outcome=outcome.value,
            duration=duration,
            detail=detail or None,
        )
        log.log(logging.INFO if outcome in _GOOD else logging.WARNING, "%s %s", what, fields)
        for listener in self.outcome_listeners:
            listener(decision, outcome)

    async def _fake_call(
        self, decision: Act, received: float, key: int, retry: bool
    ) -> tuple[Outcome, RunResult | None, str]:
        node = self.nodes.get(decision.node)
        if node is None:
            return Outcome.FAILED, None, f"node {decision.node!r} is not configured"
        try:
            prepared = build_job(decision, node, secrets.token_urlsafe(12))
        except UnsafeValue as exc:
            return Outcome.UNSAFE, None, str(exc)
        for warning in prepared.warnings:
            log.warning("fake_call_data %s", kv(call_id=decision.call_id, dropped="display name", problem=warning))
        # Only the wait for a slot is bounded by the deadline; a call that
        # got its slot in time runs to its end. Slots are shared fairly
        # between accounts (a ring group's devices wait their account's turn).
        slots, account = self.runner.slots, decision.call.aor
        if slots.at_share(account):
            self.metrics.account_share_waits.inc()
            log.info("fake_call_waits %s", kv(call_id=decision.call_id, device=decision.device, account=account,
                                              reason="the account holds its share of the slots"))  # fmt: skip
        # Without a cancel scope when nothing needs waiting for (the usual
        # case): scopes were a tenth of the worker's time in a burst.
        got_slot = slots.try_acquire(account)
        if not got_slot:
            with trio.move_on_at(decision.deadline):
                await slots.acquire(account)
                got_slot = True
        if not got_slot:
            return Outcome.OVERDUE, None, "no SIPp slot before the deadline"
        try:
            # A place in a SIPp process before the pin, so that the INVITE
            # follows the pin at once: devices of one call need one process
            # each, and more of them than processes wait for one.
            place = await self.runner.reserve(prepared.job, decision.deadline)
            if place is None:
                return Outcome.OVERDUE, None, "no SIPp process free for this Call-ID before the deadline"
            try:
                if not await self._begin(key):
                    return Outcome.DEFERRED, None, "the worker stops; saved for its restart"
                return await self._pin_and_run(decision, node, prepared, received, retry, place)
            finally:
                self.runner.release(place)
        finally:
            slots.release(account)

    async def _pin_and_run(
        self, decision: Act, node: NodeAddress, prepared: PreparedCall, received: float, retry: bool, place: Reservation
    ) -> tuple[Outcome, RunResult | None, str]:
        self.metrics.decision_latency.observe(max(0.0, trio.current_time() - received))
        if not await self._claim_shared(decision, retry):
            return Outcome.TAKEN, None, "another worker claimed this fake call (shared claim)"
        pin = Pin(
            key=prepared.pin_key, ruri=prepared.ruri, dst=prepared.dst, ttl=self.pin_ttl, aor=prepared.aor,
            claim=claim_key(decision.call_id, decision.aor, decision.device), claim_ttl=self.claim_ttl,
            retry=int(retry),
        )  # fmt: skip
        try:
            ack = await self.send_command(node.name, pin)
        except CommandFailed as exc:
            return Outcome.FAILED, None, f"pin not acknowledged: {exc}"
        if retry and ack.claim is None:
            # A node whose routes predate claims cannot tell whether the
            # first attempt went out: rather none than two.
            return Outcome.TAKEN, None, "retry after a crash; the node keeps no claims"
        if not self._won(node.name, ack):
            return Outcome.TAKEN, None, "another worker claimed this fake call"
        if trio.current_time() > decision.deadline:
            # The pin expires unused (the node reports the claim unused).
            return Outcome.OVERDUE, None, "pin acknowledged after the deadline"
        self.metrics.fake_calls_sent.inc()
        result = await self.runner.run(prepared.job, place)
        self.metrics.sipp_duration.observe(result.duration)
        return result.outcome, result, result.detail

    async def _message(self, decision: Act, received: float, key: int) -> tuple[Outcome, str]:
        call, reg = decision.call, decision.register
        node = self.nodes.get(decision.node)
        if node is None:
            return Outcome.FAILED, f"node {decision.node!r} is not configured"
        try:
            who = parties(call, node.sip_host)
            message = Message(
                ruri=sip_values.sip_uri("contact", reg.contact),
                dst=device_route(reg),
                from_uri=f"sip:{who.caller_user}@{who.caller_domain}",
                to_uri=f"sip:{who.callee_user}@{who.callee_domain}",
                body=f"call-ended;call-id={call.call_id};reason={decision.reason}",
                claim=claim_key(decision.call_id, decision.aor, decision.device),
                claim_ttl=self.claim_ttl,
            )
        except UnsafeValue as exc:
            return Outcome.UNSAFE, str(exc)
        if not await self._begin(key):
            return Outcome.DEFERRED, "the worker stops; saved for its restart"
        self.metrics.decision_latency.observe(max(0.0, trio.current_time() - received))
        if not await self._claim_shared(decision, retry=False):
            return Outcome.TAKEN, "another worker claimed this MESSAGE (shared claim)"
        try:
            result = await self.send_command(node.name, message)
        except CommandFailed as exc:
            return Outcome.FAILED, str(exc)
        if not self._won(node.name, result):
            return Outcome.TAKEN, "another worker claimed this MESSAGE"
        return Outcome.COMPLETED, ""

    async def _claim_shared(self, decision: Act, retry: bool) -> bool:
        """False when another worker, on any node, holds the claim in Redis."""
        shared = self.shared_claims
        if shared is None:
            return True
        result = await shared.claim(decision.call_id, decision.aor, decision.device, self.claim_ttl, retry=retry)
        self.metrics.shared_claims.labels(result).inc()
        return result is not ClaimResult.TAKEN

    def _won(self, node: str, result: CommandResult) -> bool:
        """Whether this worker won the claim; a node whose routes predate
        claims answers without one, and every worker sends (at least once
        becomes at least once per worker)."""
        won = result.claim is not ClaimReply.TAKEN
        if result.claim is not None:
            self.metrics.claims.labels(node, result.claim.value).inc()
        return won
