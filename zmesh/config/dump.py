"""Writing: a config Struct -> TOML text that `load_config` reads back equal."""

from __future__ import annotations

import re
from typing import Any

import msgspec

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY_RE.fullmatch(k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # 'inf', 'nan', '1e-05' are all valid TOML
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, msgspec.Struct) for x in v)


def _emit_table(obj: msgspec.Struct, prefix: str, lines: list[str]) -> None:
    """Scalars first, then [[arrays of tables]], then [sub.tables]: TOML's order."""
    items = [(f.name, getattr(obj, f.name)) for f in msgspec.structs.fields(obj)]
    items = [(k, v) for k, v in items if v is not None]  # TOML has no null: None = default
    for k, v in items:
        if not isinstance(v, msgspec.Struct) and not _is_table_list(v):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in items:
        if _is_table_list(v):
            for item in v:
                lines.extend(["", f"[[{prefix}{_toml_key(k)}]]"])
                _emit_table(item, f"{prefix}{_toml_key(k)}.", lines)
    for k, v in items:
        if isinstance(v, msgspec.Struct):
            lines.extend(["", f"[{prefix}{_toml_key(k)}]"])
            _emit_table(v, f"{prefix}{_toml_key(k)}.", lines)


def dump_toml(cfg: msgspec.Struct) -> str:
    """TOML text for a config Struct (every key written); load_config reads it back equal."""
    lines: list[str] = []
    _emit_table(cfg, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"
