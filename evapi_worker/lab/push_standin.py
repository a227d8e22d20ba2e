"""Stand-ins for Apple's and Google's push services, on loopback: real
HTTP/2 servers over TLS that check what the real ones check and answer as
they do. The demo wakes its phones with them, and the tests script their
answers; the worker's production clients reach them by ``url`` and
``ca_file``.

* APNs: ``POST /3/device/<token>``; the provider token (an ES256 JWT whose
  ``kid`` and ``iss`` must match, signed by the key's private half, at most
  an hour old), ``apns-push-type: voip``, a ``.voip`` topic,
  ``apns-priority: 10``, an ``apns-expiration``, a collapse id of at most
  64 bytes, a JSON payload of at most 5 KB carrying ``aps.call-id``. Errors
  as Apple words them. A phone can be offline: its last push per app is
  kept until its ``apns-expiration`` and delivered when it is back, as
  Apple does.
* FCM: the OAuth2 token endpoint (a JWT assertion signed RS256 by the
  service account's key, for the firebase.messaging scope) and
  ``POST /v1/projects/<id>/messages:send`` with a token it issued, a
  high-priority data message carrying ``call-id``.

Also what both need: a throw-away CA and server certificate, an APNs key
and an FCM service account.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import h2.config
import h2.connection
import h2.events
import jwt
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..core.sip_values import bracketed

__all__ = [
    "ApnsStandIn",
    "FcmStandIn",
    "ReceivedPush",
    "make_apns_key",
    "make_service_account",
    "make_tls",
    "rehearse",
    "serve_standin",
]

_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReceivedPush:
    """A push the stand-in accepted or refused, as it received it."""

    token: str
    call_id: str
    payload: dict[str, Any]
    headers: dict[str, str]
    status: int
    at: float  # trio's clock


Answer = tuple[int, dict[str, Any] | None]
Handler = Callable[[str, str, dict[str, str], bytes], Answer]


@dataclass
class _Scripted:
    """Answers a test asks for, per device token, in order; then 200."""

    script: dict[str, list[Answer]] = field(default_factory=dict)

    def next(self, token: str) -> Answer | None:
        queue = self.script.get(token)
        return queue.pop(0) if queue else None


class ApnsStandIn(_Scripted):
    def __init__(self, public_key: bytes, key_id: str, team_id: str) -> None:
        super().__init__()
        self.public_key = public_key
        self.key_id = key_id
        self.team_id = team_id
        self.received: list[ReceivedPush] = []
        self.on_push: Callable[[ReceivedPush], None] | None = None
        self._verified: tuple[str, dict[str, Any], dict[str, Any]] | None = None  # (JWT, header, claims)
        # Phones that are offline: Apple keeps the last push for each of
        # their apps (topic) until its apns-expiration, and delivers it when
        # the phone is back; an expired one (or one sent with expiration 0)
        # is never delivered.
        self._offline: set[str] = set()
        self._kept: dict[tuple[str, str], tuple[ReceivedPush, int]] = {}  # (token, topic) -> (push, expiration)
        self.expired: list[ReceivedPush] = []  # kept, and never delivered: the phone came back too late
        self.clock: Callable[[], float] = time.time  # Apple's clock, for expirations

    def answer(self, token: str, status: int, reason: str) -> None:
        """Answer the next push to ``token`` with ``status`` and Apple's ``reason``."""
        body: dict[str, Any] = {"reason": reason}
        if status == 410:
            body["timestamp"] = int(time.time() * 1000)
        self.script.setdefault(token, []).append((status, body))

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if method != "POST":
            return 405, {"reason": "MethodNotAllowed"}
        if not path.startswith("/3/device/"):
            return 404, {"reason": "BadPath"}
        token = path.removeprefix("/3/device/")
        problem = self._check(headers, body)
        if problem is not None:
            return problem
        scripted = self.next(token)
        status, reply = scripted if scripted is not None else (200, None)
        payload = json.loads(body)
        push = ReceivedPush(token, payload["aps"]["call-id"], payload, headers, status, trio.current_time())
        self.received.append(push)
        if status != 200:
            return status, reply
        if token in self._offline:
            expiration = int(headers["apns-expiration"])
            if expiration:  # 0: now or never
                self._kept[(token, headers["apns-topic"])] = (push, expiration)
        elif self.on_push is not None:
            self.on_push(push)
        return status, reply

    def goes_offline(self, token: str) -> None:
        """The phone of ``token`` is out of reach (a tunnel, flight mode):
        its pushes are kept, not delivered."""
        self._offline.add(token)

    def comes_online(self, token: str) -> list[ReceivedPush]:
        """The phone is back: the push kept for each of its apps is
        delivered (``on_push``) unless its expiration passed; returns those
        delivered."""
        self._offline.discard(token)
        delivered = []
        for key in [k for k in self._kept if k[0] == token]:
            push, expiration = self._kept.pop(key)
            if self.clock() > expiration:
                self.expired.append(push)
                continue
            delivered.append(push)
            if self.on_push is not None:
                self.on_push(push)
        return delivered

    def _check(self, headers: dict[str, str], body: bytes) -> Answer | None:
        auth = headers.get("authorization", "")
        if not auth.startswith("bearer "):
            return 403, {"reason": "MissingProviderToken"}
        token = auth.removeprefix("bearer ")
        if self._verified is not None and self._verified[0] == token:
            # A signature checked once holds for the same bytes; its age is checked each time.
            header, claims = self._verified[1], self._verified[2]
        else:
            try:
                header = jwt.get_unverified_header(token)
                claims = jwt.decode(token, self.public_key, algorithms=["ES256"], options={"require": ["iat", "iss"]})
            except jwt.PyJWTError:
                return 403, {"reason": "InvalidProviderToken"}
            self._verified = (token, header, claims)
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return 403, {"reason": "InvalidProviderToken"}
        if time.time() - float(claims["iat"]) > 3600:
            return 403, {"reason": "ExpiredProviderToken"}
        if headers.get("apns-push-type") != "voip":
            return 400, {"reason": "InvalidPushType"}
        if not headers.get("apns-topic", "").endswith(".voip"):
            return 400, {"reason": "MissingTopic"}
        if headers.get("apns-priority") != "10":
            return 400, {"reason": "BadPriority"}
        if not headers.get("apns-expiration", "").isdigit():
            return 400, {"reason": "BadExpirationDate"}
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return 400, {"reason": "BadCollapseId"}
        if len(body) > 5120:
            return 413, {"reason": "PayloadTooLarge"}
        try:
            payload = json.loads(body)
            call_id = payload["aps"]["call-id"]
        except (ValueError, KeyError, TypeError):
            return 400, {"reason": "PayloadEmpty"}
        if not isinstance(call_id, str) or not call_id:
            return 400, {"reason": "PayloadEmpty"}
        return None


class FcmStandIn(_Scripted):
    def __init__(self, public_key: bytes, client_email: str, project_id: str, token_path: str = "/token") -> None:
        super().__init__()
        self.public_key = public_key
        self.client_email = client_email
        self.project_id = project_id
        self.token_path = token_path
        self.audience = ""  # the token endpoint's URL, set once serving
        self.issued: set[str] = set()
        self.tokens_issued = 0
        self.received: list[ReceivedPush] = []
        self.validated: list[tuple[str, int]] = []  # (token, status) of validate_only requests
        self.on_push: Callable[[ReceivedPush], None] | None = None

    def answer(self, token: str, status: int, error_code: str) -> None:
        """Answer the next message to ``token`` with ``status`` and FCM's ``error_code``."""
        body = {"error": {"code": status, "status": error_code, "details": [{"errorCode": error_code}]}}
        self.script.setdefault(token, []).append((status, body))

    def revoke_tokens(self) -> None:
        """Every access token issued so far stops working (the next use is 401)."""
        self.issued.clear()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if method != "POST":
            return 405, {"error": {"status": "METHOD_NOT_ALLOWED"}}
        if path == self.token_path:
            return self._token(body)
        if path == f"/v1/projects/{self.project_id}/messages:send":
            return self._send(headers, body)
        return 404, {"error": {"status": "NOT_FOUND"}}

    def _token(self, body: bytes) -> Answer:
        form = urllib.parse.parse_qs(body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return 400, {"error": "unsupported_grant_type"}
        try:
            claims = jwt.decode(
                form.get("assertion", [""])[0], self.public_key, algorithms=["RS256"], audience=self.audience,
                options={"require": ["iat", "exp", "iss", "aud"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        if claims.get("iss") != self.client_email or "firebase.messaging" not in str(claims.get("scope")):
            return 400, {"error": "invalid_scope"}
        token = secrets.token_urlsafe(24)
        self.issued.add(token)
        self.tokens_issued += 1
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    def _send(self, headers: dict[str, str], body: bytes) -> Answer:
        auth = headers.get("authorization", "")
        if auth.removeprefix("Bearer ") not in self.issued:
            return 401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}
        try:
            message = json.loads(body)["message"]
            token, call_id = message["token"], message["data"]["call-id"]
            high = message["android"]["priority"] == "high"
        except (ValueError, KeyError, TypeError):
            return 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}
        ttl = message["android"].get("ttl", "0s")
        if not high or not isinstance(call_id, str) or not _fcm_ttl(ttl):
            return 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}
        scripted = self.next(token)
        status, reply = scripted if scripted is not None else (200, {"name": f"projects/{self.project_id}/messages/1"})
        if json.loads(body).get("validate_only") is True:
            self.validated.append((token, status))  # checked, never delivered
            return status, reply
        push = ReceivedPush(token, call_id, message, headers, status, trio.current_time())
        self.received.append(push)
        if status == 200 and self.on_push is not None:
            self.on_push(push)
        return status, reply


def _fcm_ttl(value: object) -> bool:
    """A duration as FCM takes it: seconds with an ``s``, at most 28 days."""
    if not isinstance(value, str) or not value.endswith("s"):
        return False
    try:
        seconds = float(value[:-1])
    except ValueError:
        return False
    return 0 <= seconds <= 2_419_200


async def serve_standin(
    handle: Handler,
    cert: Path,
    key: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handle`` over HTTP/2 and TLS until cancelled; reports the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    ssl_listeners = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]

    async def connection(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await _connection(stream, handle)

    await trio.serve_listeners(connection, ssl_listeners)


async def _connection(stream: trio.SSLStream[trio.SocketStream], handle: Handler) -> None:
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    requests: dict[int, tuple[dict[str, str], bytearray]] = {}
    try:
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    if event.stream_id in requests:
                        requests[event.stream_id][1].extend(event.data or b"")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in requests:
                    headers, body = requests.pop(event.stream_id)
                    status, reply = handle(headers.get(":method", ""), headers.get(":path", ""), headers, bytes(body))
                    _respond(conn, event.stream_id, status, reply)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            await stream.send_all(conn.data_to_send())
    except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
        return


def _respond(conn: h2.connection.H2Connection, stream_id: int, status: int, reply: dict[str, Any] | None) -> None:
    body = b"" if reply is None else json.dumps(reply).encode()
    headers = [(":status", str(status)), ("content-length", str(len(body)))]
    if reply is not None:
        headers.append(("content-type", "application/json"))
    conn.send_headers(stream_id, headers, end_stream=not body)
    if body:
        conn.send_data(stream_id, body, end_stream=True)


def make_tls(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for ``host`` signed by it: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evapi-worker stand-in CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        names = [x509.DNSName(host)]
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([*names, x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "standin-ca.pem", folder / "standin-cert.pem", folder / "standin-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths[2], _pem(key))
    return paths


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def make_apns_key(path: Path) -> bytes:
    """An APNs token key (.p8, P-256) at ``path``; returns its public half (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, _pem(key))
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_service_account(path: Path, project_id: str, token_uri: str) -> bytes:
    """An FCM service account key (JSON, RSA) at ``path``; returns its public half (PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": _pem(key).decode(),
        "client_email": f"evapi-worker@{project_id}.iam.gserviceaccount.com",
        "token_uri": token_uri,
    }
    _write_private(path, json.dumps(account, indent=2).encode())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- evapi-worker push standin: a rehearsal without Apple or Google -----------

STANDIN_KEY_ID = "STANDIN001"
STANDIN_TEAM = "STANDINTM1"
STANDIN_PROJECT = "evw-standin"


@dataclass(frozen=True, slots=True)
class _Rehearsal:
    ca: Path
    cert: Path
    key: Path
    apns_key: Path
    apns_public: bytes
    account: Path
    fcm_public: bytes
    client_email: str


def _make_rehearsal(folder: Path, host: str) -> _Rehearsal:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca, cert, key = make_tls(folder, host)
    apns_key = folder / f"AuthKey_{STANDIN_KEY_ID}.p8"
    account = folder / "fcm-service-account.json"
    # The token endpoint the worker asks is its token_url setting, printed below.
    fcm_public = make_service_account(account, STANDIN_PROJECT, "https://oauth2.googleapis.com/token")
    email = json.loads(account.read_text())["client_email"]
    return _Rehearsal(ca, cert, key, apns_key, make_apns_key(apns_key), account, fcm_public, email)


async def rehearse(
    folder: Path,
    apns_at: tuple[str, int],
    fcm_at: tuple[str, int],
    out: TextIO,
    *,
    task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve both stand-ins until cancelled, with a throw-away CA, an APNs
    key and an FCM service account made in ``folder``; print the settings
    that point a worker at them, then a line per push received. Reports
    the (APNs, FCM) ports."""
    made = _make_rehearsal(folder, apns_at[0])
    ca, cert, key, apns_key, account = made.ca, made.cert, made.key, made.apns_key, made.account
    apns = ApnsStandIn(made.apns_public, STANDIN_KEY_ID, STANDIN_TEAM)
    fcm = FcmStandIn(made.fcm_public, made.client_email, STANDIN_PROJECT)

    def said(provider: str) -> Callable[[ReceivedPush], None]:
        def print_push(push: ReceivedPush) -> None:
            topic = push.headers.get("apns-topic", "")
            print(
                f"push {provider} token={push.token} topic={topic or '-'} call_id={push.call_id} status={push.status}",
                file=out,
                flush=True,
            )

        return print_push

    apns.on_push, fcm.on_push = said("apns"), said("fcm")
    async with trio.open_nursery() as nursery:
        apns_port = await nursery.start(partial(serve_standin, apns.handle, cert, key, apns_at[0], apns_at[1]))
        fcm_port = await nursery.start(partial(serve_standin, fcm.handle, cert, key, fcm_at[0], fcm_at[1]))
        host, apns_host = bracketed(fcm_at[0]), bracketed(apns_at[0])
        fcm.audience = f"https://{host}:{fcm_port}/token"  # the worker's token_url
        print(
            f"""# The push stand-ins listen; paste this into the worker's settings file:
[push.apns]
key_file = "{apns_key}"
key_id = "{STANDIN_KEY_ID}"
team_id = "{STANDIN_TEAM}"
url = "https://{apns_host}:{apns_port}"
ca_file = "{ca}"

[push.fcm]
service_account_file = "{account}"
url = "https://{host}:{fcm_port}"
token_url = "{fcm.audience}"
ca_file = "{ca}"
# Each push received is printed below (token, topic, Call-ID). Ctrl-C stops.""",
            file=out,
            flush=True,
        )
        task_status.started((apns_port, fcm_port))
