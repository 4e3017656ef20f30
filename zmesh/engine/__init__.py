"""The llama.cpp engine: a slot pool with prefix reuse, stepped in batches.

- `types`: errors, `Request`, `GenerationResult`, `EngineStats`, `StepReport`.
- `llama`: the model and context, tokens, chat templates.
- `sequence`: one request's state inside the engine (sampler, text, clock).
- `pool`: slots, their radix trees, the slot policy (zmesh/slots.py) applied.
- `kvship`: export and import of a cached prefix's KV state.
- `delivery`: how a step's callbacks reach their callers (``deliver``, futures).
- `core`: `Engine`: the step, the engine thread, `submit` and `generate`.
"""

from zmesh.engine.core import Engine
from zmesh.engine.delivery import run_calls
from zmesh.engine.llama import _silence_llama_logs
from zmesh.engine.sequence import Handle
from zmesh.engine.types import (
    MIN_SLOT_CTX,
    EngineError,
    EngineStats,
    GenerationResult,
    Request,
    StepReport,
)

__all__ = [
    "MIN_SLOT_CTX",
    "Engine",
    "EngineError",
    "EngineStats",
    "GenerationResult",
    "Handle",
    "Request",
    "StepReport",
    "_silence_llama_logs",
    "run_calls",
]
