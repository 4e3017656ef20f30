"""How a benchmark prints its result: one JSON object, or one aligned line a key."""

from __future__ import annotations

import json
from collections.abc import Mapping


def print_result(res: Mapping[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res))
        return
    width = max((len(k) for k in res), default=0)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
