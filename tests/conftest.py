"""Shared fixtures: real engines on the real packaged model (loaded once per session)."""

from __future__ import annotations

import pytest

from zmesh.config import EngineConfig
from zmesh.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    eng = Engine(EngineConfig(n_slots=4, slot_ctx=1024))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def small_engine() -> Engine:
    """Few slots and a small context, so random workloads evict and roll back often."""
    eng = Engine(EngineConfig(n_slots=3, slot_ctx=160, block_size=8))
    yield eng
    eng.close()
