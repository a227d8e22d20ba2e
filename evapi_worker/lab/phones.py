"""SIPp phones and callers on loopback: the demo's stories and the
end-to-end tests register phones and place calls through them, each run
bounded in time. The phone scenarios log what they received, which
:func:`received` reads back.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import trio

from ..core.sip_values import bracketed
from ..net import free_port
from ..sipp_runner import bundled_scenario

__all__ = ["DESK_UA", "IPHONE_UA", "Phones", "phone_scenario", "received"]

IPHONE_UA = "LinphoneiOS/5.2.5 (iPhone; iOS 17.4) LinphoneSDK/5.3.0"
DESK_UA = "Yealink SIP-T46U 108.86.0.45"


def phone_scenario(name: str) -> Path:
    """A bundled phone or caller scenario, by file name."""
    return bundled_scenario().with_name(name)


class Phones:
    """SIPp phones and callers for the stories; every run is bounded in time.

    Phones register as ``user@domain`` through Kamailio's address, with a
    Contact that names the device (``dev-<instance>``), not the account;
    callers call from ``caller_domain``, a domain this Kamailio does not
    serve (so its calls need no authentication).
    """

    def __init__(
        self,
        sip_host: str,
        sip_port: int,
        folder: Path,
        domain: str | None = None,
        *,
        caller_domain: str = "caller.example.net",
        passwords: dict[str, str] | None = None,
    ) -> None:
        self.sip_host = sip_host
        self.target = f"{bracketed(sip_host)}:{sip_port}"
        self.folder = folder
        self.domain = domain or sip_host
        self.caller_domain = caller_domain
        self.passwords = passwords or {}

    async def _sipp(self, args: list[str], timeout: float) -> int | None:
        """Run SIPp; its exit code (0: every call went as scripted), None
        when it ran out of time."""
        binary = shutil.which("sipp") or "sipp"
        with trio.move_on_after(timeout):
            result = await trio.run_process(
                [binary, self.target, "-i", self.sip_host, "-m", "1", "-nostdin", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                cwd=str(self.folder),
                start_new_session=True,
            )
            return result.returncode
        return None

    async def phone(
        self,
        user: str,
        ua: str,
        instance: str,
        behaviour: str | Path,
        stay_ms: int,
        log: Path,
        *,
        transport: str = "u1",
        contact_host: str | None = None,
        port: int | None = None,
        register: Path | None = None,
    ) -> None:
        """Register ``user``, handle calls with ``behaviour`` (a bundled phone
        scenario's name, or a path) for ``stay_ms``, then unregister.
        ``contact_host`` puts another host than the phone's address in its
        Contact (a phone behind NAT); ``register`` replaces the bundled
        register-stay-unregister scenario."""
        calls = behaviour if isinstance(behaviour, Path) else phone_scenario(f"{behaviour}.xml")
        auth = ["-au", user, "-ap", self.passwords[user]] if user in self.passwords else []
        await self._sipp(
            [
                "-sf", str(register or phone_scenario("phone_register.xml")), "-oocsf", str(calls), "-t", transport,
                "-p", str(port or free_port(self.sip_host)), "-d", str(stay_ms), *auth,
                "-key", "user", user, "-key", "domain", self.domain, "-key", "ua", ua, "-key", "instance", instance,
                "-key", "contact_user", f"dev-{instance}",
                "-key", "contact_host", contact_host or bracketed(self.sip_host),
                "-cid_str", f"reg-{instance}-%u-{secrets.token_hex(3)}", "-trace_logs", "-log_file", str(log),
            ],
            timeout=stay_ms / 1000 + 10,
        )  # fmt: skip

    async def call(
        self,
        caller: str,
        caller_name: str,
        callee: str,
        call_id: str,
        scenario: Path | None = None,
        *,
        transport: str = "u1",
        log: Path | None = None,
        timeout: float = 15,
    ) -> int | None:
        """``caller`` calls ``callee``: answered calls last a second, ringing
        ones are given up after 2.5 s (or what ``scenario`` does). Returns
        SIPp's exit code (0: the call went as scripted; None: out of time);
        ``log`` keeps what the scenario logged."""
        logging = ["-trace_logs", "-log_file", str(log)] if log is not None else []
        return await self._sipp(
            [
                "-sf", str(scenario or phone_scenario("caller.xml")), "-t", transport,
                "-p", str(free_port(self.sip_host)),
                "-key", "caller", caller, "-key", "caller_name", caller_name,
                "-key", "caller_domain", self.caller_domain, "-key", "callee", callee,
                "-key", "domain", self.domain, "-cid_str", call_id, *logging,
            ],
            timeout=timeout,
        )  # fmt: skip


def received(log: Path) -> tuple[str | None, str | None]:
    """(Call-ID of the INVITE, Reason of the CANCEL) a phone logged."""
    call_id = reason = None
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None, None
    for line in lines:
        if line.startswith("invite call_id= "):
            call_id = line.split("call_id= ", 1)[1].split(" from=")[0].strip()
        elif line.startswith("cancel call_id= "):
            reason = line.split("reason=", 1)[1].strip() or None
    return call_id, reason
