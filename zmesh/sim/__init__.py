"""Discrete-event simulator of a zmesh cluster on the real routing, gossip and cache code."""

from zmesh.sim.core import SIM_POLICIES, SimConfig, SimResult, Simulator, simulate

__all__ = ["SIM_POLICIES", "SimConfig", "SimResult", "Simulator", "simulate"]
