"""CurveZMQ keys, the allowlist of mesh members and clients, and the ZAP handler.

A key pair is two ZeroMQ certificate files written by `zmesh keys gen NAME`
(`zmq.auth.create_certificates`): `NAME.key` (public, safe to share) and
`NAME.key_secret` (public + secret). The public certificate carries metadata:

    role    = "node" | "client"   nodes may do everything; clients may only send
                                 requests (no gossip subscription, no snapshots)
    tenants = "acme,beta"         (clients only) the tenants this key may use;
                                 absent: any tenant

A node with `[security] secret_key_file` set runs CURVE on every socket: its ROUTER
and PUB are CURVE servers (ZAP domains `serve` and `gossip`), its DEALERs and SUB are
CURVE clients that must know each peer's public key (seeds give it, heartbeats carry
it). The ZAP handler admits only keys from the allowlist (`authorized_dir` certificates
and `authorized_keys`); everything else is refused and logged as `auth.denied`.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85

ROLES = ("node", "client")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DOMAIN_SERVE = b"serve"
DOMAIN_GOSSIP = b"gossip"
_Z85_KEY_RE = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_META_RE = re.compile(r'^\s+([A-Za-z0-9_-]+)\s*=\s*"?(.*?)"?\s*$')


class SecurityError(Exception):
    """A key, certificate or allowlist that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    public: bytes  # z85
    name: str
    role: str = "node"
    tenants: frozenset[str] | None = None  # None: any tenant

    def may_use_tenant(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


def is_z85_key(value: str) -> bool:
    if not _Z85_KEY_RE.fullmatch(value):
        return False
    try:
        return len(z85.decode(value)) == 32
    except Exception:
        return False


def _read_cert(path: Path) -> tuple[bytes | None, bytes | None, dict[str, str]]:
    """(public, secret, metadata) of a ZeroMQ certificate file (ZPL text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"{path}: not a ZeroMQ certificate (not text)") from None
    public = secret = None
    meta: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        m = _META_RE.match(line)
        if m is None:
            continue
        key, value = m[1], m[2]
        if section == "curve" and key == "public-key":
            public = value.encode()
        elif section == "curve" and key == "secret-key":
            secret = value.encode()
        elif section == "metadata":
            meta[key] = value
    for what, key in (("public-key", public), ("secret-key", secret)):
        if key is not None and not is_z85_key(key.decode()):
            raise SecurityError(f"{path}: {what} is not a 40-character Z85 CURVE key")
    return public, secret, meta


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """This node's (or client's) key pair, from its `.key_secret` certificate."""
    p = Path(path)
    public, secret, _ = _read_cert(p)
    if secret is None or public is None:
        hint = " (this looks like a public certificate; give the .key_secret file)"
        raise SecurityError(f"{p}: no secret-key in it{hint if public else ''}")
    return KeyPair(public=public, secret=secret)


def load_public_key(value: str) -> bytes:
    """A public key given as 40 Z85 characters, or as the path of a certificate file."""
    if is_z85_key(value):
        return value.encode()
    p = Path(value)
    if len(value) == 40 and not p.exists():
        raise SecurityError(f"{value!r} is neither a Z85 CURVE key nor a certificate file")
    if not p.exists():
        raise SecurityError(f"{value}: no such certificate file (nor a 40-char Z85 key)")
    public, _, _ = _read_cert(p)
    if public is None:
        raise SecurityError(f"{p}: no public-key in it")
    return public


def _authorized_from_cert(path: Path) -> AuthorizedKey:
    public, _, meta = _read_cert(path)
    if public is None:
        raise SecurityError(f"{path}: no public-key in it")
    role = meta.get("role", "node")
    if role not in ROLES:
        raise SecurityError(f"{path}: role must be one of {', '.join(ROLES)}, got {role!r}")
    tenants = meta.get("tenants")
    allowed = frozenset(t for t in tenants.split(",") if t) if tenants is not None else None
    if allowed is not None and role == "node":
        raise SecurityError(f"{path}: tenants only apply to client keys (role = client)")
    return AuthorizedKey(
        public=public, name=meta.get("name", path.stem), role=role, tenants=allowed
    )


def load_authorized(
    directory: str | os.PathLike[str] | None, keys: Iterable[str] = ()
) -> dict[bytes, AuthorizedKey]:
    """The allowlist: every public certificate (`*.key`) in ``directory`` plus ``keys``
    (Z85 strings, taken as node keys). Secret certificates in the directory are ignored."""
    out: dict[bytes, AuthorizedKey] = {}
    if directory is not None:
        d = Path(directory)
        if not d.is_dir():
            raise SecurityError(f"{d}: not a directory")
        for path in sorted(d.glob("*.key")):
            ak = _authorized_from_cert(path)
            out[ak.public] = ak
    for i, k in enumerate(keys):
        if not is_z85_key(k):
            raise SecurityError(f"authorized_keys[{i}]: not a 40-character Z85 CURVE key")
        out.setdefault(k.encode(), AuthorizedKey(public=k.encode(), name=f"key:{k[:8]}"))
    return out


def generate(
    directory: str | os.PathLike[str],
    name: str,
    role: str = "node",
    tenants: Iterable[str] = (),
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `NAME.key` and `NAME.key_secret` into ``directory``; returns both paths."""
    import zmq.auth

    if role not in ROLES:
        raise SecurityError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise SecurityError(f"key name must be 1..64 of [A-Za-z0-9_.-], got {name!r}")
    tenant_list = [t for t in tenants if t]
    if tenant_list and role != "client":
        raise SecurityError("tenants only apply to client keys (role client)")
    if any("," in t or '"' in t for t in tenant_list):
        raise SecurityError("tenant names in a key may not contain ',' or '\"'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = d / f"{name}.key", d / f"{name}.key_secret"
    if not overwrite and (pub.exists() or sec.exists()):
        raise SecurityError(f"{pub} or {sec} exists already (keys are never overwritten)")
    meta = {"name": name, "role": role}
    if tenant_list:
        meta["tenants"] = ",".join(tenant_list)
    public_file, secret_file = zmq.auth.create_certificates(str(d), name, metadata=meta)
    os.chmod(secret_file, 0o600)
    # pyzmq writes the metadata into the secret certificate only; the allowlist reads
    # the public one, so it gets the same lines.
    pub_path = Path(public_file)
    lines = "".join(f'    {k} = "{v}"\n' for k, v in meta.items())
    text = pub_path.read_text(encoding="utf-8")
    if "\nmetadata\n" in text and lines not in text:
        pub_path.write_text(text.replace("\nmetadata\n", "\nmetadata\n" + lines, 1))
    return pub_path, Path(secret_file)


def server_socket(sock: zmq.Socket[Any], keys: KeyPair, domain: bytes) -> None:
    """Make ``sock`` (ROUTER, PUB) a CURVE server checked by the ZAP handler."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = domain
    sock.curve_server = True


def client_socket(sock: zmq.Socket[Any], keys: KeyPair, server_key: bytes) -> None:
    """Make the next ``connect`` of ``sock`` a CURVE client of the server ``server_key``.

    Socket options are copied into each connection when it is made, so a SUB can
    connect to several PUBs with different server keys: set, then connect.
    """
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key


@dataclass(slots=True)
class Denial:
    key: str  # z85 public key that tried (or "" when the mechanism was not CURVE)
    domain: str
    address: str
    reason: str
    log: bool  # False for repeats within log_every_s: count them, do not log them
    repeats: int  # denials of this (key, domain) not logged before this one


class ZapHandler:
    """ZAP (RFC 27) over the context's inproc socket, as an asyncio task.

    Allows a CURVE key when it is in ``allowed`` and, on the `gossip` domain, belongs
    to a node (clients never see gossip). The reply's User-Id is the Z85 public key,
    so the serve loop can tell who sent each message (`frame.get("User-Id")`).
    ``on_denied`` is called for every refusal, with ``log`` set at most once per
    (key, domain) per ``log_every_s`` (a refused peer retries every few 100 ms), and
    for at most ``log_burst`` refusals in all per ``log_every_s`` window (a stranger
    can draw a fresh key per connection). Refusals past that bound are summed, and
    ``on_suppressed(n, window_s)`` reports them once the window is over.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        allowed: Mapping[bytes, AuthorizedKey],
        on_denied: Callable[[Denial], None],
        log_every_s: float = 10.0,
        log_burst: int = 20,
        on_suppressed: Callable[[int, float], None] | None = None,
    ) -> None:
        self.allowed = allowed
        self.on_denied = on_denied
        self.on_suppressed = on_suppressed
        self.log_every_s = log_every_s
        self.log_burst = log_burst
        self.denied = 0
        self.accepted = 0
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._window_at = -math.inf  # start of the current window of logged refusals
        self._window_logged = 0
        self._suppressed = 0  # refusals over log_burst in the current window
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)

    def check(
        self, domain: bytes, mechanism: bytes, credentials: list[bytes]
    ) -> tuple[bool, str, bytes]:
        """(allowed, reason, user id)."""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return False, f"mechanism {mechanism.decode(errors='replace')} not accepted", b""
        key = z85.encode(credentials[0])
        ak = self.allowed.get(key)
        if ak is None:
            return False, "unknown key", key
        if domain == DOMAIN_GOSSIP and ak.role != "node":
            return False, f"{ak.role} keys may not subscribe to gossip", key
        return True, "OK", key

    def handle(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            rid = frames[1] if len(frames) > 1 else b""
            return [ZAP_VERSION, rid, b"400", b"malformed ZAP request", b"", b""]
        version, rid, domain, address, _identity, mechanism = frames[:6]
        if version != ZAP_VERSION:
            return [ZAP_VERSION, rid, b"400", b"unsupported ZAP version", b"", b""]
        ok, reason, key = self.check(domain, mechanism, frames[6:])
        if ok:
            self.accepted += 1
            return [ZAP_VERSION, rid, b"200", b"OK", key, b""]
        self.denied += 1
        self._report(
            key.decode(), domain.decode(errors="replace"), address.decode(errors="replace"), reason
        )
        return [ZAP_VERSION, rid, b"400", reason.encode(), b"", b""]

    def _report(self, key: str, domain: str, address: str, reason: str) -> None:
        now = time.monotonic()
        self.flush(now)
        last, repeats = self._last.get((key, domain), (-1e9, 0))
        log = now - last >= self.log_every_s
        if log and self._window_logged >= self.log_burst:
            log = False  # counted in the window's summary, not in this key's repeats
            self._suppressed += 1
        elif log:
            if self._window_logged == 0:
                self._window_at = now
            self._window_logged += 1
            if len(self._last) > 10_000:  # bounded: a scan of random keys must not grow it
                self._last.clear()
            self._last[(key, domain)] = (now, 0)
        else:
            self._last[(key, domain)] = (last, repeats + 1)
        self.on_denied(
            Denial(
                key=key,
                domain=domain,
                address=address,
                reason=reason,
                log=log,
                repeats=repeats if log else 0,
            )
        )

    def flush(self, now: float) -> None:
        """End the window of logged refusals once it is over, reporting the suppressed."""
        if self._window_logged == 0 or now - self._window_at < self.log_every_s:
            return
        if self._suppressed and self.on_suppressed is not None:
            self.on_suppressed(self._suppressed, round(now - self._window_at, 1))
        self._window_logged = self._suppressed = 0

    async def run(self) -> None:
        while True:
            # Woken when the window ends, so a flood's summary comes when it is over.
            self.flush(time.monotonic())
            if self._window_logged:
                left = self._window_at + self.log_every_s - time.monotonic()
                if not await self.sock.poll(max(1, math.ceil(left * 1000))):
                    continue
            frames = await self.sock.recv_multipart()
            try:
                reply = self.handle(frames)
            except Exception as exc:  # never leave a handshake without an answer
                rid = frames[1] if len(frames) > 1 else b""
                reply = [ZAP_VERSION, rid, b"500", repr(exc).encode()[:200], b"", b""]
            await self.sock.send_multipart(reply)

    def close(self) -> None:
        self.sock.close(linger=0)
