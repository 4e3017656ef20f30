"""Running estimates shared by the engine, the node, the simulator and the benches."""

from __future__ import annotations


def ewma(old: float, new: float, alpha: float = 0.2) -> float:
    """Exponentially weighted moving average; 0.0 means "no estimate yet"."""
    return new if old == 0.0 else (1 - alpha) * old + alpha * new
