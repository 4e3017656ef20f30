"""Simulator, holder push (`routing.ship_push`): offers go out from busy holders on
the node's decision code, land only in free slots, and every request is answered once."""

from __future__ import annotations

from collections import Counter

from zmesh.sim.core import SimConfig, Simulator
from zmesh.sim.state import Job, SimNode
from zmesh.workload import Arrivals, shared_prefix_workload


class _Checked(Simulator):
    """Counts every answer, and checks that each pushed import evicts nothing."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.answers: Counter[int] = Counter()
        self.evicted = 0

    def _complete(self, job: Job, node: SimNode) -> None:
        self.answers[job.index] += 1
        super()._complete(job, node)

    def _on_kv_push_ready(self, got: tuple[object, ...], _: object) -> None:
        peer = self.nodes[got[0]]  # type: ignore[index]
        held = [s for s in peer.cache.slots if s]  # type: ignore[union-attr]
        super()._on_kv_push_ready(got, _)
        after = [s for s in peer.cache.slots if s]  # type: ignore[union-attr]
        self.evicted += sum(1 for s in held if s not in after)


def _run(push: bool, n_slots: int = 4) -> tuple[_Checked, dict[str, object]]:
    # One long shared prompt (a hotspot) at a rate one node cannot serve alone.
    wl = shared_prefix_workload(300, groups=1, alpha=1.0, prefix_words=400, seed=3)
    cfg = SimConfig(
        nodes=4,
        n_slots=n_slots,
        seed=1,
        entry="one",
        routing={"ship_push": push, "max_hops": 0},
    )
    sim = _Checked(cfg, wl, Arrivals("poisson", rate=6.0))
    return sim, sim.run().figures


def test_a_hot_holder_pushes_to_idle_peers_and_every_request_is_answered_once() -> None:
    sim, f = _run(True)
    assert f["requests"] == 300 and f["errors"] == 0
    assert set(sim.answers.values()) == {1} and len(sim.answers) == 300
    offers, accepted = f["push_offers"], f["push_accepted"]
    assert isinstance(offers, int) and isinstance(accepted, int)
    assert offers >= 1 and 1 <= accepted <= offers
    assert f["push_imported"] == accepted and f["pushed_tokens"] > 0
    assert sim.evicted == 0
    off = _run(False)[1]
    assert "push_offers" not in off


def test_push_is_off_by_default_in_the_simulator() -> None:
    cfg = SimConfig(nodes=2, seed=1)
    wl = shared_prefix_workload(20, groups=1, alpha=1.0, prefix_words=100, seed=3)
    f = Simulator(cfg, wl, Arrivals("poisson", rate=2.0)).run().figures
    assert "push_offers" not in f
