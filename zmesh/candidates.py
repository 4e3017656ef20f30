"""What routing is given: one node's view of every candidate, built one way everywhere.

Pure functions (no I/O, no clock: callers pass the time that has elapsed) shared by
the node (`Node._route`) and the simulator, so that what the simulator assumes is
what a node does:

- `head_key`: the 64-bit key of the prompt head that ``consistent_hash`` places by;
- `predict_s`, `backlog_s`: a one-at-a-time node's load model (how long a request
  will take, how much work waits ahead of a new one: the simulator's nodes);
- `batch_depth`, `batch_wait_s`: a node that runs up to ``max_running`` requests at
  once (continuous batching): its depth, and its wait as its engine runs it (one
  prompt prefills at a time, in the order requests got places): what a node
  advertises; with ``max_running=1`` the wait is `backlog_s`;
- `unreported_s`, `free_places`: work we forwarded to a peer since its last heartbeat
  (which cannot count it yet), added to the backlog that peer advertised: its prefill
  when the peer has places free for it and for the new request, else all of it;
- `local_candidate`, `peer_candidate`: the `Candidate` rows `decide` takes;
- `borrowed_rate`: a rate not measured yet, from peers on like hardware;
- `ship_s_per_token`, `ship_fixed_s`: what pulling a peer's cached prefix costs
  (KV shipping: the two `Candidate` fields `routing/shipping.py` reads);
- `contenders`: for a caller with many peers (the simulator at 1,000 nodes), the
  peers that can still win a ``zmesh`` / ``paper`` decision, so it need not build
  the rest. The decision on them is the one the full list gives.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from zmesh.routing.base import (
    MASK64,
    Candidate,
    RoutingSettings,
    charged_s,
    is_overloaded,
    near_best,
)

if TYPE_CHECKING:
    from zmesh.peers import PeerEstimate

__all__ = [
    "BORROW_FACTOR",
    "DEFAULT_DECODE_S_PER_TOKEN",
    "DEFAULT_HASH_PREFIX_TOKENS",
    "DEFAULT_LINK_DELAY_S",
    "DEFAULT_PREFILL_S_PER_TOKEN",
    "DEFAULT_SERVICE_S",
    "PeerRow",
    "Work",
    "backlog_s",
    "batch_depth",
    "batch_wait_s",
    "borrowed_rate",
    "contenders",
    "free_places",
    "head_key",
    "local_candidate",
    "peer_candidate",
    "predict_prefill_s",
    "predict_s",
    "ship_fixed_s",
    "ship_s_per_token",
    "unreported_s",
]

# Until measured (a node's own figures replace these as soon as it has served).
DEFAULT_PREFILL_S_PER_TOKEN = 0.002  # about what 2 CPU cores do
DEFAULT_DECODE_S_PER_TOKEN = 0.015
DEFAULT_SERVICE_S = 0.5
DEFAULT_LINK_DELAY_S = 0.001
BORROW_FACTOR = 10.0  # a borrowed rate stays within this factor of the default
DEFAULT_HASH_PREFIX_TOKENS = 64  # consistent_hash: tokens of the prompt head hashed


def head_key(
    block_ids: Sequence[int], tokens: Sequence[int], block_size: int, hash_prefix_tokens: int
) -> int:
    """The prompt head's 64-bit key: the id of the block that ends ``hash_prefix_tokens``
    in (or the last full block); a prompt shorter than one block hashes its tokens."""
    if block_ids:
        return block_ids[min(len(block_ids), max(1, hash_prefix_tokens // block_size)) - 1]
    return hash(tuple(tokens[:block_size])) & MASK64


def predict_s(
    new_tokens: int,
    max_tokens: int,
    prefill_s_per_token: float,
    decode_s_per_token: float,
    completion_tokens: float = 0.0,
) -> float:
    """Predicted service time of a request that must prefill ``new_tokens`` (at least
    one: the last prompt token's logits start the answer) and may write ``max_tokens``;
    ``completion_tokens``: how long answers really are (an average; 0: unknown), since
    most stop well before their limit."""
    expect = min(max_tokens, 2 * completion_tokens) if completion_tokens else max_tokens
    return max(new_tokens, 1) * prefill_s_per_token + expect * decode_s_per_token


def predict_prefill_s(new_tokens: int, prefill_s_per_token: float) -> float:
    """The prefill part of `predict_s`: until the request's first token, once it prefills."""
    return max(new_tokens, 1) * prefill_s_per_token


def backlog_s(
    queued_s: float, running_predicted_s: float | None, running_elapsed_s: float
) -> float:
    """Predicted seconds until a request arriving now would start: the predictions of
    the queued requests, plus what is left of the running one's (None: none runs)."""
    running = 0.0
    if running_predicted_s is not None:
        running = max(running_predicted_s - running_elapsed_s, 0.0)
    return queued_s + running


def batch_depth(waiting: int, running: int) -> int:
    """Requests on a node that runs several at once: waiting, plus those running."""
    return waiting + running


class Work(NamedTuple):
    """A request's predicted seconds on a node: until its first token once it prefills
    (``prefill_s``), and in all (``service_s``: prefill + decode)."""

    prefill_s: float
    service_s: float


def batch_wait_s(
    running: Sequence[tuple[float, Work]], queued: Sequence[Work], max_running: int
) -> float:
    """Predicted seconds until a request arriving now would start its own prefill on a
    node whose engine runs up to ``max_running`` requests at once and prefills one
    prompt at a time (each step carries one chunk of the oldest unfinished prompt beside
    every decoding sequence): ``running`` is ``(elapsed_s, work)`` of the requests that
    hold places, in the order they got them; ``queued``, those waiting, in order.

    The new request waits for a place (the first to free, each waiting request taking
    one before it) and for the prefills of every request ahead of it, whichever is
    later; a request's place frees once its prefill (after those ahead) and its decode
    are done. A node with free places but prompts still prefilling is not idle. With
    ``max_running=1`` this is `backlog_s`.
    """
    lane = -math.inf  # when the prompts ahead are all prefilled (0: now)
    frees: list[float] = []  # when each place frees
    for elapsed, w in running:
        lane = max(-elapsed, lane) + w.prefill_s
        frees.append(max(lane + max(w.service_s - w.prefill_s, 0.0), 0.0))
    lane = max(lane, 0.0)
    places = max(max_running, 1)
    frees += [0.0] * max(places - len(frees), 0)
    heapq.heapify(frees)
    for w in queued:
        lane = max(heapq.heappop(frees), lane) + w.prefill_s
        heapq.heappush(frees, lane + max(w.service_s - w.prefill_s, 0.0))
    return max(frees[0], lane)


def free_places(places: int, depth: int) -> int:
    """Places a peer had free when it last said so (``places`` 0: it did not say, and
    is taken as one-at-a-time: a request it holds leaves none)."""
    return max(places - depth, 0) if places > 0 else 0


def unreported_s(
    forwards: Iterable[tuple[float, ...]], last_heard: float | None, free: int = 0
) -> float:
    """Predicted seconds of the forwards to one peer, ``(sent_at, cost_s[, prefill_s])``,
    sent after its last heartbeat (``last_heard``, the same clock): its advertised
    backlog cannot include them yet.

    On a peer that had ``free`` places (`free_places`) and still has one for the new
    request once they took theirs, they only prefill ahead of it (`batch_wait_s`), so
    each adds its ``prefill_s`` (missing: its cost); otherwise, all of each ``cost_s``.
    """
    heard = last_heard or 0.0
    costs: list[float] = []
    prefills: list[float] = []
    for f in forwards:
        if f[0] > heard:
            costs.append(f[1])
            prefills.append(f[2] if len(f) > 2 else f[1])
    return sum(prefills) if len(costs) < free else sum(costs)


def borrowed_rate(values: Iterable[float], default: float) -> float:
    """A rate this node has not measured yet: peers on like hardware are a better guess
    than a constant, but only the median of two or more measured ones (> 0), kept
    within BORROW_FACTOR of ``default``; with fewer, ``default``."""
    known = sorted(v for v in values if v > 0)
    if len(known) < 2:
        return default
    median = known[len(known) // 2]
    return min(max(median, default / BORROW_FACTOR), default * BORROW_FACTOR)


def ship_s_per_token(
    bytes_per_token: float, bandwidth_bytes_per_s: float, import_s_per_token: float
) -> float:
    """Seconds per token to bring a peer's KV here and load it: the wire (bytes per
    token over the link's bandwidth) plus the import into this engine."""
    return bytes_per_token / bandwidth_bytes_per_s + import_s_per_token


def ship_fixed_s(
    link_delay_s: float, decode_s_per_token: float = DEFAULT_DECODE_S_PER_TOKEN
) -> float:
    """A pull's cost that does not grow with its size: the round trip (ask, answer),
    and the holder's pause until its next decode step, between which it exports."""
    return 2 * link_delay_s + decode_s_per_token


def local_candidate(
    node_id: str,
    matched_tokens: int,
    queue: int,
    wait_s: float,
    prefill_s_per_token: float,
    service_s: float,
    evict_tokens: int | None = None,
) -> Candidate:
    """This node as a candidate: its own match, queue and backlog, no link; and what a
    miss here would overwrite (``evict_tokens``, as it advertises; None: not known,
    and then no candidate is charged for evictions)."""
    return Candidate(
        node_id=node_id,
        is_local=True,
        matched_tokens=matched_tokens,
        queue_depth=queue,
        link_delay_s=0.0,
        prefill_s_per_token=prefill_s_per_token,
        service_s=service_s,
        wait_s=wait_s,
        evict_tokens=evict_tokens,
    )


def peer_candidate(
    peer: PeerEstimate,
    matched_tokens: int,
    *,
    inflight: int,
    unreported_s: float,
    link_delay_s: float,
    prefill_s_per_token: float,
    service_s: float,
    ship_s_per_token: float | None = None,
    ship_fixed_s: float = 0.0,
) -> Candidate:
    """A peer as this node sees it: its estimated match (``matched_tokens``: whole
    blocks of the prompt its advertised set holds, times the block size), its heard
    queue plus our forwards in flight there (``inflight``), its heard backlog plus our
    forwards it has not reported (``unreported_s``), and its measured rates (ours,
    ``prefill_s_per_token`` and ``service_s``, until it has advertised its own), and
    what a miss there would evict (its advertised ``evict_tokens``)."""
    return Candidate(
        node_id=peer.node_id,
        is_local=False,
        matched_tokens=matched_tokens,
        queue_depth=peer.queue_depth + inflight,
        link_delay_s=link_delay_s,
        prefill_s_per_token=peer.prefill_s_per_token or prefill_s_per_token,
        service_s=peer.service_s or service_s,
        wait_s=peer.backlog_s + unreported_s,
        ship_s_per_token=ship_s_per_token,
        ship_fixed_s=ship_fixed_s,
        evict_tokens=peer.evict_tokens,
    )


# ---- the peers that can win (callers with many peers) --------------------------------


class PeerRow(NamedTuple):
    """One peer's figures before a `Candidate` is built (cheap to make by the thousand)."""

    blocks: int  # whole blocks of the prompt its estimate holds
    queue: int
    est_s: float  # link + wait + prefill of what it lacks: `estimate_s` of its Candidate
    node_id: str
    ref: object  # the caller's handle (the simulator: its estimate and index)
    wait_s: float
    link_s: float
    prefill_s_per_token: float


def row_estimate_s(link_s: float, wait_s: float, missing_tokens: int, prefill: float) -> float:
    """`estimate_s` from a row's parts (``missing_tokens``: the prompt past its match)."""
    return link_s + (wait_s if wait_s > 0.0 else 0.0) + missing_tokens * prefill


def contenders(
    rows: Sequence[PeerRow], local: Candidate, prompt_tokens: int, settings: RoutingSettings
) -> list[PeerRow]:
    """The peers that can still be chosen by ``zmesh`` (or ``paper``) among ``rows``.

    Peers with the same match differ only in link delay + wait, so of each match
    length only the lowest estimate (ties: lowest id, as `decide` breaks them) among
    those not overloaded or past the give-up can win; the least-queued peer is kept
    too, since the balance rule compares every queue with the minimum. Placement
    chooses among every node near the best estimate, so those are all kept.
    """
    min_q = local.queue_depth
    for row in rows:
        if row.queue < min_q:
            min_q = row.queue
    best: dict[int, PeerRow] = {}
    least: PeerRow | None = None
    give_up = settings.give_up_s or math.inf
    for row in rows:
        if least is None or row.queue < least.queue:
            least = row
        if is_overloaded(row.queue, min_q, settings) or row.est_s > give_up:
            continue
        cur = best.get(row.blocks)
        if (
            cur is None
            or row.est_s < cur.est_s
            or (row.est_s == cur.est_s and row.node_id < cur.node_id)
        ):
            best[row.blocks] = row
    keep = {id(row): row for row in best.values()}
    if least is not None:
        keep.setdefault(id(least), least)
    if settings.place_slack_frac > 0.0 and best:
        lowest = min(
            charged_s(local, prompt_tokens, settings), *(row.est_s for row in best.values())
        )
        bar = min(near_best(lowest, settings), give_up)
        for row in rows:
            if row.est_s <= bar and not is_overloaded(row.queue, min_q, settings):
                keep.setdefault(id(row), row)
    return list(keep.values())
