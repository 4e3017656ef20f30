"""Loading: TOML or plain data -> a validated `NodeConfig`, with `ZMESH_*` overrides.

msgspec's validation errors become `ConfigError`s naming the dotted key.
Environment overrides: `ZMESH_<KEY>` sets a top-level key, a double underscore
nests (`ZMESH_ENGINE__N_SLOTS=4`, `ZMESH_GOSSIP__DEAD_AFTER_S=5`). String keys take
the value verbatim; other keys parse it as a TOML value (`4`, `true`, `0.5`,
`[{serve = "tcp://h:1", gossip = "tcp://h:2"}]`). An empty value resets an
optional string key to its default (None). Every `ZMESH_*` variable is taken as
an override, so a misspelt one is an error rather than silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import msgspec

from zmesh.config.checks import ConfigError
from zmesh.config.node import NodeConfig

ENV_PREFIX = "ZMESH_"


# ---- schema walking (for error paths and env overrides) -----------------------------


def _fields(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def _as_struct(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _struct_at(path: str) -> type[msgspec.Struct] | None:
    """The Struct type at a dotted path like `seeds[0]` or `engine`, if any."""
    cls: type[msgspec.Struct] | None = NodeConfig
    for part in filter(None, path.split(".")):
        name, indexed = part.split("[", 1)[0], "[" in part
        tp = _fields(cls).get(name) if cls else None
        if indexed and get_origin(tp) is list:
            tp = get_args(tp)[0]
        cls = _as_struct(tp)
    return cls


def _is_str_type(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return all(a is str or a is type(None) for a in get_args(tp))
    return False


# ---- msgspec errors -> ConfigError -------------------------------------------------

_AT_RE = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_MISSING_RE = re.compile(r"Object missing required field `(?P<key>[^`]*)`")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _translate(exc: msgspec.ValidationError) -> tuple[str | None, str]:
    """(dotted key, message) for a msgspec validation error."""
    m = _AT_RE.fullmatch(str(exc))
    assert m is not None  # the pattern matches any string
    msg, path = m["msg"], (m["path"] or "").lstrip(".")
    if um := _UNKNOWN_RE.fullmatch(msg):
        key = um["key"]
        text = f"unknown key '{key}' in {path or 'the top level'}"
        cls = _struct_at(path)
        if cls is not None and (near := difflib.get_close_matches(key, _fields(cls), n=1)):
            text += f" (did you mean '{near[0]}'?)"
        return _join(path, key), text
    if mm := _MISSING_RE.fullmatch(msg):
        return _join(path, mm["key"]), "missing required key"
    if msg.startswith("Expected"):
        text = msg.replace("`object`", "table").replace("`", "")
        return path or None, text[0].lower() + text[1:]
    # A __post_init__ ValueError: "field: why", raised inside the struct at `path`.
    field, sep, why = msg.partition(": ")
    cls = _struct_at(path)
    if sep and cls is not None and field in _fields(cls):
        return _join(path, field), why
    return path or None, msg


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> NodeConfig:
    """Build a validated NodeConfig from plain data (a parsed TOML document)."""
    try:
        return msgspec.convert(d, NodeConfig)
    except msgspec.ValidationError as exc:
        key, message = _translate(exc)
        raise ConfigError(source, key, message) from None


# ---- environment overrides ---------------------------------------------------------


def _env_value(raw: str, tp: Any) -> Any:
    if _is_str_type(tp):
        return None if raw == "" and tp is not str else raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # let type checking report it: "expected int, got str"
    return value if isinstance(value, str | int | float | bool | list | dict) else raw


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    """(variable, key path, value) for each ZMESH_* variable, in name order."""
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        cls: type[msgspec.Struct] | None = NodeConfig
        tp: Any = None
        for i, part in enumerate(parts):
            if cls is None:
                raise ConfigError("environment", name, f"'{'.'.join(parts[:i])}' is not a table")
            fields = _fields(cls)
            if part not in fields:
                dotted = ".".join(parts)
                raise ConfigError("environment", name, f"unknown config key '{dotted}'")
            tp = fields[part]
            cls = _as_struct(tp)
        out.append((name, parts, _env_value(environ[name], tp)))
    return out


def apply_env_overrides(d: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the config dict `d` with `ZMESH_*` variables from `environ` applied."""
    out = copy.deepcopy(dict(d))
    for name, parts, value in _env_overrides(environ):
        table = out
        for part in parts[:-1]:
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError("environment", name, f"'{part}' is not a table in the config")
            table = sub
        table[parts[-1]] = value
    return out


# ---- loading -----------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read a TOML node config; `ZMESH_*` from `env` (default os.environ) override it."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    environ = os.environ if env is None else env
    overrides = _env_overrides(environ)
    data = apply_env_overrides(data, environ)
    try:
        return config_from_dict(data, source)
    except ConfigError as exc:
        # Point at the variable when the bad value came from the environment.
        for name, parts, _ in overrides:
            dotted = ".".join(parts)
            if exc.key and (exc.key == dotted or exc.key.startswith((dotted + ".", dotted + "["))):
                raise ConfigError(source, exc.key, f"{exc.message} (set by {name})") from None
        raise
