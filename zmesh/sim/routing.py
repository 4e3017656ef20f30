"""Routing in the simulator: an entry node's decision, as `Node._route` makes it.

Candidates are built with `zmesh.candidates` (the node's own functions); only those
that can change the outcome are passed to `routing.decide` (`contenders`; the least
loaded peer; the alive set for the cache-blind baselines). Above ``max_candidates``
peers a documented subset is considered: the longest estimated holders plus a random
sample. ``verify`` decides on the full list as well (tests compare the two).
"""

from __future__ import annotations

from dataclasses import replace

from zmesh.candidates import (
    PeerRow,
    contenders,
    head_key,
    local_candidate,
    peer_candidate,
    row_estimate_s,
    unreported_s,
)
from zmesh.peers import PeerEstimate, PeerState
from zmesh.routing import (
    PAPER,
    Candidate,
    PolicyState,
    RouteRequest,
    decide,
)
from zmesh.routing.admission import admission_bar, after_refusal
from zmesh.routing.base import miss_evicts
from zmesh.routing.shipping import evict_held
from zmesh.sim.base import SimBase
from zmesh.sim.state import Job, SimNode, View


class RoutingMixin(SimBase):
    def _route(self, node: SimNode, job: Job) -> tuple[int, str]:
        """The entry node's decision: `routing.decide` on the candidates `Node._route` builds.

        Only candidates that can change the outcome are passed (see `_zmesh_candidates`,
        `_least_loaded_candidates`); the decision is the one the full list gives.
        """
        cost = self.cost
        tokens, ids = job.tokens, job.ids
        service = node.service_ewma or cost.service_s(len(tokens), 1)
        paper = self.policy == PAPER
        local_match = node.cache.match(tokens)
        if self.cfg.pending_prefixes:
            queued = [*node.queue, *node.running]
            local_match = max(local_match, self._pending_match(ids, queued))
        local = local_candidate(
            node.name,
            local_match,
            0 if paper else self._queue_depth(node),
            0.0 if paper else self._backlog(node),
            cost.prefill_s_per_token,
            service,
        )
        view = self.views[self.view_of[node.idx]]
        if self.settings.evict_charge > 0.0:  # what the node advertises, as peers see it
            local = replace(local, evict_tokens=node.cache.miss_evict_tokens())
        if self.settings.ship:
            local = replace(
                local,
                ship_evict_tokens=node.cache.import_evicts(tokens),
                ship_evict_held=self._evict_held(node, view, tokens)
                if self.settings.ship_evict_pull_back
                else (),
            )
        policy = self.policy
        self._refused = job.refused_by  # left out of the candidates (admission)
        if policy in ("zmesh", PAPER):
            cands = self._zmesh_candidates(node, view, job, local)
        elif policy == "least_loaded":
            cands = self._least_loaded_candidates(node, view, local)
        else:
            cands = [local, *(c for c in self._static_candidates(view) if c.node_id != node.name)]
        bs = self.cfg.block_size
        head = head_key(ids, tokens, bs, self.cfg.hash_prefix_tokens)
        req = RouteRequest(
            prompt_tokens=len(tokens), hops=0, head_key=head, block_ids=ids, block_size=bs
        )
        if self.cfg.verify and not job.refused_by:
            self._verify(node, view, job, local, req, cands)
        self._refused = ()
        if job.refused_by:
            refused = [self.names[p] for p in job.refused_by]
            d = after_refusal(req, cands, refused, self.settings, node.policy_state)
        else:
            d = decide(req, cands, self.settings, node.policy_state)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        target = self.by_name[d.target]
        if d.pull_from is not None:  # "shipped": pull while the request queues here
            self._start_pull(node, job, self.by_name[d.pull_from], d.pull_tokens)
        job.bar = admission_bar(d, self.settings, self._evict_s(node, job, d.forward))
        if self.cfg.diagnose:
            picked = next(c for c in cands if c.node_id == d.target)
            self._note_pick(job, target, picked.queue_depth == 0)
        return target, d.reason

    def _evict_s(self, node: SimNode, job: Job, forward: bool) -> float:
        """Prefill of what serving ``job`` here would overwrite (the admission bar's)."""
        if not (forward and self.settings.admission and self.settings.admit_evictions):
            return 0.0
        return node.cache.evicted_tokens(job.tokens) * self.cost.prefill_s_per_token

    def _verify(
        self,
        node: SimNode,
        view: View,
        job: Job,
        local: Candidate,
        req: RouteRequest,
        pruned: list[Candidate],
    ) -> None:
        """Decide on every alive peer too, built as `Node._route` builds them (tests)."""
        if self.policy not in ("zmesh", PAPER, "least_loaded"):
            return
        if self.limit and len(view.alive) > self.limit:
            return  # a sampled subset: nothing exact to compare with
        full = [local]
        bs = self.cfg.block_size
        ship = self.settings.ship
        for p, est in self._candidate_peers(view, node.idx, job.ids):
            link = self._measured_delay(node.idx, p)
            per_token, fixed = self._ship_terms(node.idx, p, link) if ship else (None, 0.0)
            full.append(
                peer_candidate(
                    est,
                    est.match_blocks(job.ids) * bs,
                    inflight=node.inflight.get(p, 0),
                    unreported_s=self._unreported_s(node, p, est),
                    link_delay_s=link,
                    prefill_s_per_token=local.prefill_s_per_token,
                    service_s=local.service_s,
                    ship_s_per_token=per_token,
                    ship_fixed_s=fixed,
                )
            )
        state = PolicyState.seeded(0)
        a = decide(req, pruned, self.settings, state)
        b = decide(req, full, self.settings, state)
        self.checked.append(((a.target, a.reason), (b.target, b.reason)))

    def _pending_match(self, ids: list[int], jobs: list[Job]) -> int:
        """Tokens of the longest block prefix shared with any of ``jobs``."""
        best = 0
        for j in jobs:
            n = 0
            for a, b in zip(ids, j.ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best * self.cfg.block_size

    def _unreported_s(self, node: SimNode, p: int, est: PeerEstimate) -> float:
        return unreported_s(
            ((f.fwd_sent, f.fwd_cost) for f in node.fwd_out.get(p, ())), est.last_heard
        )

    def _peer_load(self, node: SimNode, p: int, est: PeerEstimate) -> tuple[int, float]:
        """(queue, wait) as `peer_candidate` makes them: heard load + our own forwards."""
        return est.queue_depth + node.inflight.get(p, 0), est.backlog_s + self._unreported_s(
            node, p, est
        )

    def _zmesh_candidates(
        self, node: SimNode, view: View, job: Job, local: Candidate
    ) -> list[Candidate]:
        """Local plus the peers that can win (`candidates.contenders`)."""
        ids = job.ids
        me = node.idx
        peers = self._candidate_peers(view, me, ids)
        paper = self.policy == PAPER
        prompt = len(job.tokens)
        bs = self.cfg.block_size
        prefill = self.cost.prefill_s_per_token
        # Exact mode reads every peer's match off the index; a subset asks each estimate.
        exact = len(peers) + 1 >= len(view.alive)
        use_index = view.holders is not None and exact
        matches = self._index_matches(view.holders, ids) if use_index else None  # type: ignore[arg-type]
        mget = matches.get if matches is not None else None
        fwd_out = node.fwd_out
        inflight = node.inflight
        link = 0.0 if paper else self._mean_delay
        spread = self.cfg.delay_spread > 0
        pending = self.cfg.pending_prefixes
        charge = self.settings.evict_charge
        rows = []
        for p, est in peers:
            m = mget(p, 0) if mget is not None else est.match_blocks(ids)
            if pending and p in fwd_out:
                m = max(m, self._pending_match(ids, fwd_out[p]) // bs)
            if paper:
                q, wait = 0, 0.0
            else:
                q = est.queue_depth
                wait = est.backlog_s
                if inflight:
                    q += inflight.get(p, 0)
                    if p in fwd_out:
                        q, wait = self._peer_load(node, p, est)
                if spread:
                    link = self._measured_delay(me, p)
            pf = est.prefill_s_per_token or prefill
            missing = prompt - min(m * bs, prompt)
            score = row_estimate_s(link, wait, missing, pf)
            if charge and est.evict_tokens:  # `charged_s`, as decide adds it
                score += charge * miss_evicts(m * bs, prompt, est.evict_tokens) * pf
            rows.append(PeerRow(m, q, score, est.node_id, (p, est), wait, link, pf))
        cands = [local]
        service = local.service_s
        keep = contenders(rows, local, prompt, self.settings)
        ship = self.settings.ship
        if ship:
            # Every peer a pull could come from (`best_pull`'s own filter) may win it.
            enough = local.matched_tokens + self.settings.ship_min_tokens
            # And every holder of what the import would evict (`evict_charge_s`).
            held = {node_id for node_id, _ in local.ship_evict_held}
            kept = {id(row) for row in keep}
            keep += [
                r
                for r in rows
                if (r.blocks * bs >= enough or r.node_id in held) and id(r) not in kept
            ]
        for row in keep:
            p, est = row.ref  # type: ignore[misc]
            # The real estimate's match; the index only told us which peers to look at.
            matched = est.match_blocks(ids) * bs if use_index and not pending else row.blocks * bs
            per_token, fixed = self._ship_terms(me, p, row.link_s) if ship else (None, 0.0)
            cands.append(
                Candidate(
                    row.node_id,
                    False,
                    matched,
                    row.queue,
                    row.link_s,
                    row.prefill_s_per_token,
                    est.service_s or service,
                    True,
                    row.wait_s,
                    per_token,
                    fixed,
                    evict_tokens=est.evict_tokens,
                )
            )
        return cands

    def _least_loaded_candidates(
        self, node: SimNode, view: View, local: Candidate
    ) -> list[Candidate]:
        """Local plus the least-queued peer (lowest id on ties): the only one that can win."""
        best: tuple[int, str, int, PeerEstimate, float] | None = None
        for p, est in self._candidate_peers(view, node.idx, []):
            q, wait = self._peer_load(node, p, est)
            if best is None or q < best[0] or (q == best[0] and est.node_id < best[1]):
                best = (q, est.node_id, p, est, wait)
        if best is None:
            return [local]
        _, _, p, est, _ = best
        peer = peer_candidate(
            est,
            0,
            inflight=node.inflight.get(p, 0),
            unreported_s=self._unreported_s(node, p, est),
            link_delay_s=self._measured_delay(node.idx, p),
            prefill_s_per_token=local.prefill_s_per_token,
            service_s=local.service_s,
        )
        return [local, peer]

    def _static_candidates(self, view: View) -> list[Candidate]:
        """Every alive node as a load- and cache-blind candidate (random, round robin, hash).

        Those policies read only the candidates' ids; the list is rebuilt when the set
        of alive nodes changes.
        """
        key = tuple(p for p, _ in view.alive)
        if view.static_key != key:
            c = self.cost
            view.static_key = key
            view.static = [
                Candidate(
                    est.node_id,
                    False,
                    0,
                    0,
                    self.cfg.delay_s,
                    c.prefill_s_per_token,
                    c.base_s,
                    True,
                    0.0,
                )
                for _, est in view.alive
            ]
        return view.static

    def _evict_held(
        self, node: SimNode, view: View, tokens: tuple[int, ...]
    ) -> tuple[tuple[str, int], ...]:
        """Alive peers (as this node's view has them) holding a leading part of what a
        pull's import would evict here, as the node's route() asks its PeerTable."""
        me = node.idx
        peers = (est for p, est in view.alive if p != me)
        return evict_held(peers, node.cache.import_victim_ids(tokens), self.cfg.block_size)

    def _candidate_peers(
        self, view: View, me: int, ids: list[int]
    ) -> list[tuple[int, PeerEstimate]]:
        """Every alive peer; above ``max_candidates`` (zmesh, paper): a documented subset.

        The subset is the peers whose estimates hold the longest prefixes of the prompt
        (half of it, from the shared estimates' index) and a uniform random sample of
        the others, so load can still be balanced (power of d choices).
        """
        alive = view.alive
        if not self.limit or len(alive) <= self.limit or not self.uses_matches:
            return [pe for pe in alive if pe[0] != me and pe[0] not in self._refused]
        table = view.table
        names = self.names
        chosen: dict[int, PeerEstimate] = {}
        if view.holders is not None:
            want = self.limit // 2
            for p in self._best_holders(view.holders, ids, want + 1):
                if p != me:
                    est = table.get(names[p])
                    if est is not None and est.state is PeerState.ALIVE:
                        chosen[p] = est
                if len(chosen) >= want:
                    break
        # A uniform sample of the rest (power of d choices for load).
        rand = self.rng.random
        n_alive = len(alive)
        for _ in range(2 * self.limit):
            if len(chosen) >= self.limit:
                break
            p, est = alive[int(rand() * n_alive)]
            if p != me and p not in chosen:
                chosen[p] = est
        return list(chosen.items())

    @staticmethod
    def _index_matches(holders: dict[int, set[int]], ids: list[int]) -> dict[int, int]:
        """node -> leading ``ids`` in its estimate, for every node with at least one."""
        out: dict[int, int] = {}
        if not ids:
            return out
        cur = holders.get(ids[0])
        if not cur:
            return out
        for i in range(1, len(ids)):
            h = holders.get(ids[i])
            nxt = cur & h if h else set()
            if len(nxt) != len(cur):
                for p in cur - nxt:
                    out[p] = i
            if not nxt:
                return out
            cur = nxt
        for p in cur:
            out[p] = len(ids)
        return out

    @staticmethod
    def _best_holders(holders: dict[int, set[int]], ids: list[int], k: int) -> list[int]:
        """Up to ``k`` nodes whose estimates hold the longest prefixes of ``ids``."""
        # Estimates are prefix-closed: the held levels are a prefix of ids; bisect it.
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if holders.get(ids[mid - 1]):
                lo = mid
            else:
                hi = mid - 1
        depth = lo
        out: list[int] = []
        seen: set[int] = set()
        for level in range(depth - 1, -1, -1):
            held = holders[ids[level]]
            if len(held) <= len(out):
                continue  # prefix-closed sets: no one new at this level
            for h in held:
                if h not in seen:
                    seen.add(h)
                    out.append(h)
                    if len(out) >= k:
                        return out
        return out
