"""``evapi-worker push check`` against the stand-ins, each answer Apple or
Google gives; the keys read from systemd's credentials folder by another
user; ``push standin`` and ``push check`` as an operator runs them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import msgspec
import pytest
import trio

from evapi_worker.config import ConfigError, PushSettings, config_from
from evapi_worker.push_check import MADE_UP_APNS_TOKEN, MADE_UP_FCM_TOKEN, CheckResult, check_push
from evapi_worker.pusher import key_path, push_clients

from ..push_services import StandIns, start_standins

TOPIC = "org.linphone.phone.voip"
PHONE = "ab" * 32
WORKER = str(Path(sys.executable).with_name("evapi-worker"))


async def checked(standins: StandIns, settings: PushSettings | None = None, **kw: object) -> list[CheckResult]:
    return await check_push(settings or standins.settings, topic=TOPIC, **kw)  # type: ignore[arg-type]


async def test_made_up_tokens_check_the_credentials_without_waking_anyone(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        s.apns.answer(MADE_UP_APNS_TOKEN, 400, "BadDeviceToken")  # as Apple answers a token no phone has
        s.fcm.answer(MADE_UP_FCM_TOKEN, 400, "INVALID_ARGUMENT")
        apns, fcm = await checked(s)
        nursery.cancel_scope.cancel()
    assert apns.ok and apns.reason == "BadDeviceToken" and "key id and team id are accepted" in apns.meaning
    assert fcm.ok and fcm.reason == "INVALID_ARGUMENT" and "service account is accepted" in fcm.meaning
    # FCM's check delivered nothing: validate_only.
    assert s.fcm.received == [] and s.fcm.validated == [(MADE_UP_FCM_TOKEN, 400)]


async def test_a_phone_s_token_is_pushed_and_an_android_token_validated(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        apns, fcm = await checked(s, apns_token=PHONE, fcm_token="android-1")
        sandbox = await checked(s, msgspec.structs.replace(s.settings, fcm=None), apns_token=PHONE, sandbox=True)
        nursery.cancel_scope.cancel()
    assert (apns.ok, apns.status, fcm.ok, fcm.status) == (True, 200, True, 200)
    assert "the phone is woken" in apns.meaning and "nothing was sent" in fcm.meaning
    assert [p.token for p in s.apns.received] == [PHONE, PHONE]
    assert s.apns.received[0].headers["apns-topic"] == TOPIC
    assert [r.provider for r in sandbox] == ["apns.dev"]
    assert s.fcm.received == [] and s.fcm.validated == [("android-1", 200)]


@pytest.mark.parametrize(
    ("status", "reason", "says"),
    [
        (403, "ExpiredProviderToken", "clock is off"),
        (400, "BadDeviceToken", "other environment"),  # a sandbox token sent to production
        (400, "DeviceTokenNotForTopic", "another app"),
        (400, "TopicDisallowed", "may not push to the topic"),
        (410, "Unregistered", "app was removed"),
        (429, "TooManyRequests", "try later"),
    ],
)
async def test_each_apns_answer_is_explained(tmp_path: Path, status: int, reason: str, says: str) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        s.apns.answer(PHONE, status, reason)
        (result,) = await checked(s, msgspec.structs.replace(s.settings, fcm=None), apns_token=PHONE)
        nursery.cancel_scope.cancel()
    assert (result.ok, result.status, result.reason) == (False, status, reason)
    assert says in result.meaning, result.meaning
    assert result.text().startswith("apns (https://127.0.0.1:") and "FAILED" in result.text()


@pytest.mark.parametrize("wrong", ["key_id", "team_id"])
async def test_a_wrong_key_id_or_team_is_refused_by_the_stand_in_as_by_apple(tmp_path: Path, wrong: str) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        assert s.settings.apns is not None
        apns = msgspec.structs.replace(s.settings.apns, **{wrong: "WRONG12345"})
        (result,) = await checked(s, PushSettings(apns=apns))
        nursery.cancel_scope.cancel()
    assert (result.ok, result.status, result.reason) == (False, 403, "InvalidProviderToken")
    assert "key_id, team_id or the key file" in result.meaning


async def test_fcm_answers_are_explained(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        only_fcm = PushSettings(fcm=s.settings.fcm)
        s.fcm.answer("android-gone", 404, "UNREGISTERED")
        (gone,) = await checked(s, only_fcm, fcm_token="android-gone")
        s.fcm.answer("android-other", 403, "SENDER_ID_MISMATCH")
        (other,) = await checked(s, only_fcm, fcm_token="android-other")
        s.fcm.client_email = "someone-else@evw-test.iam.gserviceaccount.com"  # the key was replaced
        (refused,) = await checked(s, only_fcm)
        nursery.cancel_scope.cancel()
    assert (gone.ok, gone.reason) == (False, "UNREGISTERED") and "removed" in gone.meaning
    assert (other.ok, other.reason) == (False, "SENDER_ID_MISMATCH") and "another Firebase project" in other.meaning
    assert not refused.ok and "token endpoint refused the service account" in refused.meaning


async def test_no_answer_and_missing_values_are_said(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        s = await start_standins(nursery, tmp_path)
        assert s.settings.apns is not None
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        nowhere = PushSettings(apns=msgspec.structs.replace(s.settings.apns, url=f"https://127.0.0.1:{port}"))
        (result,) = await checked(s, nowhere)
        closed.close()
        with pytest.raises(ConfigError, match="--topic"):
            await check_push(s.settings)
        with pytest.raises(ConfigError, match="nothing to check"):
            await check_push(PushSettings())
        nursery.cancel_scope.cancel()
    assert (result.ok, result.status) == (False, 0) and "no answer" in result.meaning


def test_a_credential_s_name_is_found_in_systemd_s_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY is not set"):
        key_path(Path("apns.p8"), "push.apns.key_file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert key_path(Path("apns.p8"), "push.apns.key_file") == tmp_path / "apns.p8"
    assert key_path(Path("/etc/x.p8"), "push.apns.key_file") == Path("/etc/x.p8")
    with pytest.raises(ConfigError, match="one file name"):
        key_path(Path("../apns.p8"), "push.apns.key_file")


@pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another user (needs root)")
def test_the_worker_as_another_user_reads_its_keys_as_systemd_lays_them_out() -> None:
    """systemd's LoadCredential= copies each key into a folder of the
    service's own (a ramfs: the files are chowned to the service's user,
    0400, in a 0500 folder). The worker, running as that user, finds a
    key_file given by the credential's name there; the originals stay
    root's, 0600, unreadable to it."""
    nobody = 65534
    # pytest's folders are root's alone: a folder the other user can reach.
    base = Path(tempfile.mkdtemp(prefix="evw-credentials-"))
    try:
        _as_another_user(base, nobody)
    finally:
        shutil.rmtree(base)


def _as_another_user(tmp_path: Path, nobody: int) -> None:
    originals = tmp_path / "etc"
    originals.mkdir(mode=0o700)
    from evapi_worker.lab.push_standin import make_apns_key, make_service_account

    make_apns_key(originals / "AuthKey.p8")
    make_service_account(originals / "fcm.json", "evw-test", "https://oauth2.googleapis.com/token")
    creds = tmp_path / "credentials" / "evapi-worker.service"
    creds.mkdir(parents=True)
    for name, source in (("apns.p8", "AuthKey.p8"), ("fcm.json", "fcm.json")):
        (creds / name).write_bytes((originals / source).read_bytes())
        os.chown(creds / name, nobody, nobody)
        (creds / name).chmod(0o400)
    os.chown(creds, nobody, nobody)
    creds.chmod(0o500)
    (tmp_path / "credentials").chmod(0o755)
    tmp_path.chmod(0o755)
    settings = tmp_path / "worker.toml"
    settings.write_text(
        "[push.apns]\nkey_file = 'apns.p8'\nkey_id = 'ABC123DEFG'\nteam_id = 'TEAM123456'\n"
        "[push.fcm]\nservice_account_file = 'fcm.json'\n"
    )
    code = (
        "import sys, tomllib; from evapi_worker.config import config_from; "
        "from evapi_worker.pusher import push_clients; "
        "c = config_from(tomllib.load(open(sys.argv[1], 'rb'))); print(sorted(push_clients(c.push)))"
    )

    def as_nobody(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", sys.executable, "-c", code,
             str(settings)],
            capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **env}, cwd="/",
        )  # fmt: skip

    ok = as_nobody({"CREDENTIALS_DIRECTORY": str(creds)})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "['apns', 'apns.dev', 'fcm']"
    # The originals, as the unit without credentials would read them: refused, with the way out.
    direct = settings.read_text().replace("'apns.p8'", repr(str(originals / "AuthKey.p8")))
    settings.write_text(direct.replace("'fcm.json'", repr(str(originals / "fcm.json"))))
    refused = as_nobody({})
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr and "load it as a credential" in refused.stderr


def test_push_standin_and_push_check_as_an_operator_runs_them(tmp_path: Path) -> None:
    """The installed commands: the stand-ins print the settings to paste,
    the check uses them, and the stand-in prints the push it got."""
    standin = subprocess.Popen(
        [WORKER, "push", "standin", "--dir", str(tmp_path / "keys")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert standin.stdout is not None
        lines = []
        for line in standin.stdout:
            lines.append(line)
            if line.startswith("# Each push received"):
                break
        text = "".join(lines)
        config = config_from(tomllib.loads(text))
        assert config.push.apns is not None and config.push.fcm is not None
        assert set(push_clients(config.push)) == {"apns", "apns.dev", "fcm"}
        (tmp_path / "worker.toml").write_text(text)
        check = subprocess.run(
            [WORKER, "push", "check", "--config", str(tmp_path / "worker.toml"), "--topic", TOPIC,
             "--apns-token", PHONE, "--fcm-token", "android-1"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert re.search(r"^apns \(https://127\.0\.0\.1:\d+\): 200 accepted$", check.stdout, re.M), check.stdout
        assert "fcm (" in check.stdout and "nothing was sent" in check.stdout
        pushed = standin.stdout.readline()
        assert pushed.startswith(f"push apns token={PHONE} topic={TOPIC} call_id=evapi-worker-push-check-"), pushed
        bad = subprocess.run(
            [WORKER, "push", "check", "--config", str(tmp_path / "worker.toml")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 2 and "--topic" in bad.stderr
    finally:
        standin.terminate()
        standin.wait(timeout=10)
        if standin.stdout is not None:
            standin.stdout.close()
