"""Where a request's prompt is tokenized: short text on the loop, long text on the
tokenizer thread, token ids checked on the loop (real model, real executor)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from zmesh import protocol as P
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.node.request import INLINE_TOKENIZE_CHARS, prompt_tokens


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.used = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.used += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig(n_slots=1, slot_ctx=2048, n_threads=1))
    yield eng
    eng.close()


def _ask(prompt: str | None = None, tokens: list[int] | None = None) -> P.Generate:
    return P.Generate(request_id="t", prompt=prompt, tokens=tokens)


def test_short_prompts_skip_the_tokenizer_thread_long_ones_take_it(engine: Engine) -> None:
    ex = CountingExecutor()
    short = "word " * (INLINE_TOKENIZE_CHARS // 5)
    long = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1)
    try:
        got = asyncio.run(prompt_tokens(engine, ex, _ask(short)))
        assert got == engine.prompt_tokens(short, None) and ex.used == 0
        assert asyncio.run(prompt_tokens(engine, ex, _ask(tokens=got))) == got
        assert ex.used == 0  # token ids (a forward) are checked on the loop
        assert asyncio.run(prompt_tokens(engine, ex, _ask(long))) == engine.prompt_tokens(
            long, None
        )
        assert ex.used == 1
    finally:
        ex.shutdown()
