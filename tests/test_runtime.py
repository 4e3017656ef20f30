"""[runtime]: the GIL switch interval and gc.freeze a node runs under, and put back.

The unit tests drive `Runtime` alone; the node test runs a real `Node` (real model,
real sockets) on its own loop thread and reads the process's settings while it runs
and after it stopped.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest
from meshkit import RunningNode

from zmesh.config import EngineConfig, RuntimeConfig, config_from_dict
from zmesh.engine import Engine
from zmesh.lab import free_ports
from zmesh.node.runtime import Runtime


@pytest.fixture
def python_defaults() -> Iterator[float]:
    """Each test starts from (and leaves) an unfrozen heap and Python's own interval."""
    before = sys.getswitchinterval()
    gc.unfreeze()
    yield before
    sys.setswitchinterval(before)
    gc.unfreeze()


def test_defaults_leave_the_switch_interval_and_freeze() -> None:
    cfg = RuntimeConfig()
    assert cfg.switch_interval_ms == 0  # no measured gain: CPython's own
    assert cfg.gc_freeze


def test_apply_then_restore(python_defaults: float) -> None:
    rt = Runtime(RuntimeConfig(switch_interval_ms=0.25, gc_freeze=True))
    rt.apply()
    assert sys.getswitchinterval() == pytest.approx(0.00025)
    assert gc.get_freeze_count() > 0
    rt.restore()
    assert sys.getswitchinterval() == python_defaults
    assert gc.get_freeze_count() == 0


def test_zero_and_off_leave_python_alone(python_defaults: float) -> None:
    rt = Runtime(RuntimeConfig(switch_interval_ms=0, gc_freeze=False))
    rt.apply()
    assert sys.getswitchinterval() == python_defaults
    assert gc.get_freeze_count() == 0
    rt.restore()
    assert sys.getswitchinterval() == python_defaults


def test_the_last_node_of_a_process_restores(python_defaults: float) -> None:
    """Two nodes in one process (as in tests): the first to stop leaves the second's
    settings alone; the last puts the process's own back."""
    a = Runtime(RuntimeConfig(switch_interval_ms=0.5))
    b = Runtime(RuntimeConfig(switch_interval_ms=0.5))
    a.apply()
    b.apply()
    a.restore()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert gc.get_freeze_count() > 0
    a.restore()  # twice: no effect
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    b.restore()
    assert sys.getswitchinterval() == python_defaults
    assert gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig(n_slots=1, slot_ctx=256, n_threads=1))
    yield eng
    eng.close()


def test_a_node_applies_its_runtime_settings_and_restores_them(
    engine: Engine, python_defaults: float
) -> None:
    ports = free_ports(2)
    cfg = config_from_dict(
        {
            "node_id": "rt",
            "serve_addr": f"tcp://127.0.0.1:{ports[0]}",
            "gossip_addr": f"tcp://127.0.0.1:{ports[1]}",
            "runtime": {"switch_interval_ms": 0.3, "gc_freeze": True},
        }
    )
    rn = RunningNode(cfg, engine)  # returns once the node is ready
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0003)
        assert gc.get_freeze_count() > 0
    finally:
        rn.stop()
    assert not rn.thread.is_alive()
    assert sys.getswitchinterval() == python_defaults
    assert gc.get_freeze_count() == 0
