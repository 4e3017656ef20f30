"""Fault injection for labs and tests: link delay, partitions, dropped cache deltas.

A node starts with its config's `[faults]` (and `gossip.drop_deltas`). With
`faults.control_file` set, it checks that JSON file every heartbeat tick: when the
file appears or changes, its keys replace the configured values (keys it leaves out
keep them); when it disappears, the configured values return. Each change is logged
as `fault.changed`; a file that does not parse is logged as `fault.invalid` and the
faults in effect stay. Example file:

    {"delay_ms": 80, "partition": ["node-b"], "drop_deltas": 0.2}

Whoever can write the node's files can change its faults, so the file needs no
authentication; leave `control_file` unset outside labs. `zmesh.lab.Lab` writes one
per node (`partition`, `heal`, `set_delay`, `set_faults`).

`FaultInjector` applies the faults in effect to one node's links: its transport
hands it every send to a peer while a fault is on (cut by a partition, or held in
the `DelayLine`), and its receive loops ask it whether a peer is cut off.

Sans-IO apart from reading that file; `DelayLine` needs a running event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from zmesh.protocol import FaultSettings

__all__ = [
    "MAX_DELAY_MS",
    "DelayLine",
    "FaultControl",
    "FaultError",
    "FaultInjector",
    "fault_problem",
    "parse_faults",
]

MAX_DELAY_MS = 60_000.0
MAX_DELAYED = 100_000  # frames held at once; more are dropped (and counted), never block
_NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEYS = frozenset(FaultSettings.__struct_fields__)


class FaultError(ValueError):
    """A fault setting that cannot be applied; the message names the key."""


def fault_problem(f: FaultSettings) -> tuple[str, str] | None:
    """(key, why) for the first bad value of ``f``, or None if it can be applied."""
    if not (0.0 <= f.delay_ms <= MAX_DELAY_MS and math.isfinite(f.delay_ms)):
        return "delay_ms", f"must be in 0..{MAX_DELAY_MS:g}, got {f.delay_ms}"
    for peer in f.partition:
        if not _NODE_ID_RE.fullmatch(peer):
            return "partition", f"{peer!r} is not a node id (1-64 of [A-Za-z0-9_.-])"
    if not 0.0 <= f.drop_deltas <= 1.0:
        return "drop_deltas", f"must be in 0..1, got {f.drop_deltas}"
    return None


def parse_faults(data: bytes, base: FaultSettings) -> FaultSettings:
    """The settings a control file asks for: its keys over ``base``. Raises FaultError."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise FaultError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FaultError(f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise FaultError(f"unknown keys {unknown}; known: {sorted(_KEYS)}")
    try:
        f = msgspec.convert({**msgspec.structs.asdict(base), **raw}, FaultSettings)
    except msgspec.ValidationError as exc:
        raise FaultError(str(exc)) from None
    if (problem := fault_problem(f)) is not None:
        raise FaultError(f"{problem[0]}: {problem[1]}")
    return f


class FaultControl:
    """The faults in effect: the configured ones, or the control file's while it exists."""

    def __init__(self, base: FaultSettings, path: str | None = None) -> None:
        self.base = base
        self.path = path
        self.current = base
        self._seen: tuple[int, int, int] | None = None  # the file's (inode, mtime, size)

    def poll(self) -> tuple[FaultSettings, str] | None:
        """New settings and where they came from, when they changed since the last poll.

        Raises FaultError (once per version of the file) when the file is unusable;
        the settings in effect then stay.
        """
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return None
        self._seen = seen
        if seen is None:
            new, source = self.base, "config"
        else:
            try:
                with open(self.path, "rb") as fh:
                    data = fh.read(1 << 20)
            except OSError as exc:
                raise FaultError(f"{self.path}: cannot read: {exc}") from None
            try:
                new, source = parse_faults(data, self.base), self.path
            except FaultError as exc:
                raise FaultError(f"{self.path}: {exc}") from None
        if new == self.current:
            return None
        self.current = new
        return new, source


class DelayLine:
    """Holds outgoing frames for a while without blocking the loop, in FIFO order:
    like a slow link, a later frame never overtakes an earlier one."""

    def __init__(self, send: Callable[[Any, list[bytes]], bool], limit: int = MAX_DELAYED):
        self._send = send
        self._limit = limit
        self._frames: deque[tuple[float, Any, list[bytes]]] = deque()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, sock: Any, frames: list[bytes], delay_s: float) -> bool:
        """Send ``frames`` on ``sock`` in ``delay_s``; False when the line is full."""
        if len(self._frames) >= self._limit:
            return False
        due = time.monotonic() + delay_s
        if self._frames:
            due = max(due, self._frames[-1][0])  # no overtaking when the delay drops
        self._frames.append((due, sock, frames))
        self._wake.set()
        return True

    async def run(self) -> None:
        while True:
            if not self._frames:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, sock, frames = self._frames[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._frames.popleft()
            self._send(sock, frames)


class FaultInjector:
    """The faults in effect on one node's links (config [faults], or the control file).

    Off, a send costs its caller one bool test (`on`). ROUTER replies count as peer
    traffic by identity, learned from a peer's forwards, pings and snapshot requests
    (`remember`), so replies to a peer are delayed or cut too.
    """

    def __init__(
        self,
        control: FaultControl,
        send: Callable[[Any, list[bytes]], bool],
        count: Callable[..., None],
        log: Any,
    ) -> None:
        self.control = control
        self._send = send
        self._count = count
        self.log = log
        self.delayed = DelayLine(send)
        self.on = False
        self.delay_s = 0.0
        self.partition: frozenset[str] = frozenset()
        # Which ROUTER identity is which peer, both ways (one identity per peer).
        self.peer_idents: dict[bytes, str] = {}
        self._ident_of_peer: dict[str, bytes] = {}

    @property
    def current(self) -> FaultSettings:
        return self.control.current

    def poll(self) -> None:
        """Apply the control file's settings if they changed (logged if unusable)."""
        try:
            changed = self.control.poll()
        except FaultError as exc:
            self._count("faults_invalid")
            self.log.warning("fault.invalid", error=str(exc))
            return
        if changed is not None:
            self.apply(*changed)

    def apply(self, f: FaultSettings, source: str) -> None:
        self.delay_s = f.delay_ms / 1000
        self.partition = frozenset(f.partition)
        # The delay line stays in the path until it drains, so nothing overtakes.
        self.on = bool(self.delay_s or self.partition or len(self.delayed))
        if self.on or f.drop_deltas or source != "config":
            self._count("faults_changed")
            self.log.warning(
                "fault.changed",
                source=source,
                delay_ms=f.delay_ms,
                partition=sorted(f.partition),
                drop_deltas=f.drop_deltas,
            )

    def send(self, sock: Any, frames: list[bytes], peer: str) -> bool:
        """A send to a peer while faults are on: cut by a partition, or delayed."""
        if peer in self.partition:
            self._count("fault_dropped_out")
            return True  # lost on the way, as on a cut link: the sender cannot tell
        if self.delay_s > 0 or len(self.delayed):
            if self.delayed.push(sock, frames, self.delay_s):
                return True
            self._count("fault_delay_overflow")
            return False
        return self._send(sock, frames)

    def cut_off(self, peer: str | None) -> bool:
        """Whether a message from ``peer`` is ignored because of an injected partition."""
        if peer is None or peer not in self.partition:
            return False
        self._count("fault_dropped_in")
        return True

    def remember(self, ident: bytes, node: str) -> None:
        """``ident`` is ``node``'s ROUTER identity now (a reconnect replaces the old one)."""
        old = self._ident_of_peer.get(node)
        if old != ident:  # a reconnect: one identity per peer, so this stays small
            self.peer_idents.pop(old or b"", None)
            self.peer_idents[ident] = node
            self._ident_of_peer[node] = ident

    def forget(self, node: str) -> None:
        self.peer_idents.pop(self._ident_of_peer.pop(node, b""), None)
