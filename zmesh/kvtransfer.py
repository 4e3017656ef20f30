"""Moving a KV state between peers, sans-IO: cutting it into parts, putting it back
together under a size cap, and the measured costs that tell routing whether a move
beats a prefill.

Over the wire a state is ``parts`` `KvPart` replies to one `KvFetch` on the existing
DEALER -> ROUTER pair: part 0 carries the header, every part a slice of at most
`KV_PART_BYTES` of the payload. `Assembly` takes the parts in order and refuses
anything out of order, over the asker's cap or past the part count; it never holds
more than the cap. `ShipCosts` keeps what shipping costs as exponentially weighted
averages of real transfers (bytes per token, import seconds per byte, each link's
bandwidth), starting from configured values, so no constant in code decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zmesh import protocol as P
from zmesh.candidates import ship_s_per_token
from zmesh.kvstate import KvRefused, KvState, pack, unpack
from zmesh.stats import ewma


def split(state: KvState, request_id: str, part_bytes: int = P.KV_PART_BYTES) -> list[P.KvPart]:
    """The KvParts that carry ``state``: the header in part 0, the payload in slices."""
    header, payload = pack(state)
    step = max(1, part_bytes)
    slices = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    return [
        P.KvPart(
            request_id=request_id,
            part=i,
            parts=len(slices),
            header=header if i == 0 else b"",
            data=data,
        )
        for i, data in enumerate(slices)
    ]


@dataclass
class Assembly:
    """Collects the parts of one fetch; `add` returns the state once it is complete."""

    max_bytes: int
    _header: bytes = b""
    _parts: int = 0
    _next: int = 0
    _data: list[bytes] = field(default_factory=list)
    _size: int = 0

    def add(self, part: P.KvPart) -> KvState | None:
        """Raises `KvRefused` for a part out of order or over the cap."""
        if part.part != self._next:
            raise KvRefused("order", f"KV part {part.part} arrived, expected {self._next}")
        if part.part == 0:
            if part.parts < 1:
                raise KvRefused("malformed", f"KV state in {part.parts} parts")
            self._header, self._parts = part.header, part.parts
        elif part.parts != self._parts:
            raise KvRefused("malformed", "KV part count changed during a transfer")
        self._size += len(part.data)
        if self._size > self.max_bytes:
            raise KvRefused("too_large", f"KV state over the {self.max_bytes}-byte cap")
        self._data.append(part.data)
        self._next += 1
        if self._next < self._parts:
            return None
        return unpack(self._header, b"".join(self._data))


@dataclass
class ShipCosts:
    """What moving a prefix costs, measured: EWMAs of real states, imports and
    transfers. The configured start values stand until the first measurement."""

    start_bytes_per_token: float
    start_import_s_per_byte: float
    start_bandwidth_bps: float  # bytes per second on a link never measured
    measured_bytes_per_token: float = 0.0  # 0.0: nothing measured yet
    measured_import_s_per_byte: float = 0.0
    bandwidth_bps: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        return self.measured_bytes_per_token or self.start_bytes_per_token

    @property
    def import_s_per_byte(self) -> float:
        return self.measured_import_s_per_byte or self.start_import_s_per_byte

    def observe_state(self, n_tokens: int, nbytes: int) -> None:
        if n_tokens > 0 and nbytes > 0:
            self.measured_bytes_per_token = ewma(self.measured_bytes_per_token, nbytes / n_tokens)

    def observe_import(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.measured_import_s_per_byte = ewma(
                self.measured_import_s_per_byte, seconds / nbytes
            )

    def observe_transfer(self, peer: str, nbytes: int, seconds: float, delay_s: float) -> None:
        """A fetch of ``nbytes`` from ``peer`` took ``seconds`` from ask to last part;
        the link's one-way delay is not bandwidth, so it is taken off (twice: ask and
        answer). Transfers too small to time are ignored."""
        wire = seconds - 2 * delay_s
        if nbytes >= 64 * 1024 and wire > 0:
            old = self.bandwidth_bps.get(peer, 0.0)
            self.bandwidth_bps[peer] = ewma(old, nbytes / wire)

    def forget(self, peer: str) -> None:
        self.bandwidth_bps.pop(peer, None)

    def ship_s_per_token(self, peer: str) -> float:
        """Seconds per token to bring ``peer``'s KV here and load it (wire + import)."""
        bandwidth = self.bandwidth_bps.get(peer) or self.start_bandwidth_bps
        per_token = self.bytes_per_token
        return ship_s_per_token(per_token, bandwidth, per_token * self.import_s_per_byte)
