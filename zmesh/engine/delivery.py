"""How a step's callbacks reach their callers: inline, through ``deliver``, or settling.

A step collects ``(sequence, callback)`` pairs: streamed text (`bind`), ends, and the
`Settle` calls that resolve a `Handle`'s future. `deliver_calls` runs a request's
callbacks on the engine thread when it was submitted ``inline``, hands the others to
the engine's ``deliver`` in one call (one hop to an event loop), and settles the
futures on the engine thread afterwards, whatever ``deliver`` did with its calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zmesh.engine.sequence import Sequence

log = logging.getLogger("zmesh.engine")
Call = Callable[[], None]


def run_calls(calls: list[Call]) -> None:
    """The default ``deliver``: run a step's callbacks on the engine thread."""
    for call in calls:
        try:
            call()
        except Exception:  # a caller's callback must not stop the engine
            log.exception("engine callback failed")


class Settle:
    """A step callback that resolves a Handle's future: run on the engine thread, after
    the callbacks before it were run or handed to ``deliver`` (see `deliver_calls`)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Call) -> None:
        self.fn = fn

    def __call__(self) -> None:
        self.fn()


def bind(fn: Callable[[str], None], text: str) -> Call:
    """``fn(text)`` as a callback."""
    return lambda: fn(text)


def deliver_calls(
    calls: list[tuple[Sequence, Call]], deliver: Callable[[list[Call]], None]
) -> None:
    """Inline callbacks here, in order; the others in one `deliver` call, then
    their futures here: once `deliver` returned (for the default one, after the
    callbacks ran), and even if it raised or hands them to a loop that never runs
    them (a node that stopped), so nobody waiting on a Handle hangs."""
    hop: list[Call] = []
    settle: list[Call] = []
    for s, call in calls:
        if s.inline:
            run_calls([call])
        elif isinstance(call, Settle):
            settle.append(call)
        else:
            hop.append(call)
    try:
        if hop:
            deliver(hop)
    except Exception:  # its callbacks are lost; the engine and the futures are not
        log.exception("engine deliver failed")
    run_calls(settle)
