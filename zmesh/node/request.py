"""One accepted request's facts, computed once and carried through the node's pipeline.

A `RequestContext` is made when a Generate is accepted, after its prompt is tokenized
(the only tokenization on a node: a forward carries the token ids, so the peer never
tokenizes again). Its block ids are hashed once with the engine's hasher for the
request's namespace, and its local prefix match is taken once. Routing, holder-side
admission, the forward, the KV pull and the worker's job all read it; none recomputes
these facts. The local match is a snapshot: after a forward (an await during which the
cache may change) the pipeline takes a fresh one (`rematched`) before deciding again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import Executor
from dataclasses import dataclass

from zmesh import protocol as P
from zmesh.engine import Engine


@dataclass(frozen=True, slots=True)
class RequestContext:
    msg: P.Generate
    envelope: list[bytes]  # ROUTER envelope of whoever asked: replies go there
    scope: bytes  # whose request ids these are (admission.scope)
    client: bytes | None  # counted against max_inflight_per_client (None: a peer)
    namespace: str  # the tenant's cache namespace
    tokens: list[int]
    block_ids: list[int]  # of every full block of `tokens`, in `namespace`
    block_size: int
    local_match: int  # tokens of `tokens` cached here when last matched
    received_at: float  # unix time

    @classmethod
    def build(
        cls,
        engine: Engine,
        msg: P.Generate,
        envelope: list[bytes],
        scope: bytes,
        client: bytes | None,
        namespace: str,
        tokens: list[int],
        received_at: float,
    ) -> RequestContext:
        hasher = engine.hasher(namespace)
        return cls(
            msg=msg,
            envelope=envelope,
            scope=scope,
            client=client,
            namespace=namespace,
            tokens=tokens,
            block_ids=hasher.block_ids(tokens),
            block_size=hasher.block_size,
            local_match=engine.local_match(tokens, namespace),
            received_at=received_at,
        )

    @property
    def request_id(self) -> str:
        return self.msg.request_id

    @property
    def key(self) -> tuple[bytes, str]:
        return self.scope, self.msg.request_id

    def rematched(self, engine: Engine) -> RequestContext:
        """The same request with its local match taken again (the cache moved on)."""
        return dataclasses.replace(
            self, local_match=engine.local_match(self.tokens, self.namespace)
        )


# Prompts up to this many characters are tokenized on the loop: 1,149 characters take
# 0.49 ms (p50, idle), as long as the hop to the tokenizer thread and back at idle,
# and that hop costs milliseconds more on busy cores (two thread wake-ups; see
# docs/evaluation.md). Longer ones would hold the loop too long.
INLINE_TOKENIZE_CHARS = 2048


async def prompt_tokens(engine: Engine, tokenizer: Executor, msg: P.Generate) -> list[int]:
    """The request's prompt as checked token ids (raises EngineError). Text is tokenized
    on ``tokenizer`` (a long prompt takes seconds) unless it is short; token ids, what a
    peer's forward carries, are checked here: a pass over a list, cheaper than the hop
    to that thread and back, which a forward would otherwise pay on every hop."""
    if msg.prompt is None or len(msg.prompt) <= INLINE_TOKENIZE_CHARS:
        return engine.prompt_tokens(msg.prompt, msg.tokens)
    return await asyncio.get_running_loop().run_in_executor(
        tokenizer, engine.prompt_tokens, msg.prompt, msg.tokens
    )
