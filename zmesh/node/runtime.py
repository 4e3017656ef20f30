"""The interpreter settings a node runs under ([runtime], `RuntimeConfig`).

Both are process-wide, so a node sets them once it is up and puts them back when it
stops (a test process may run several nodes one after another):

- the GIL switch interval (`sys.setswitchinterval`): how long a thread that wants the
  GIL waits before asking the holder to drop it. The node's loop thread shares it
  with the engine thread (Python between two `llama_decode` calls) and the tokenizer
  thread; at CPython's 5 ms a reply the loop could send at once may wait that long.
- `gc.freeze()` once the node is up: what is alive then (the model's Python objects,
  modules, config, sockets) lives as long as the node, and frozen it is never scanned
  again, so a collection pays only for what requests allocated since.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

from zmesh.config import RuntimeConfig

# Nodes of one process (tests run several) share these settings: the first to start
# saves the process's own, the last to stop puts them back.
_nodes = 0
_saved_switch_s = 0.0


@dataclass
class Runtime:
    """Applies a node's [runtime] settings to the process, and puts them back."""

    config: RuntimeConfig
    applied: bool = False

    def apply(self) -> None:
        """Once the node is up (model loaded, sockets bound, before its first request)."""
        global _nodes, _saved_switch_s
        if self.applied:
            return
        if _nodes == 0:
            _saved_switch_s = sys.getswitchinterval()
        _nodes += 1
        self.applied = True
        if self.config.switch_interval_ms > 0:
            sys.setswitchinterval(self.config.switch_interval_ms / 1000)
        if self.config.gc_freeze:
            gc.collect()  # what startup left as garbage is freed, not frozen
            gc.freeze()

    def restore(self) -> None:
        """On node stop: the process's own settings back once no node runs."""
        global _nodes
        if not self.applied:
            return
        self.applied = False
        _nodes -= 1
        if _nodes == 0:
            sys.setswitchinterval(_saved_switch_s)
            gc.unfreeze()

    def log_fields(self) -> dict[str, object]:
        """For `node.started`: what the process runs under now."""
        return {
            "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
            "gc_frozen": gc.get_freeze_count(),
        }
