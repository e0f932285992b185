"""Building the config dataclasses from a mapping: each value checked against its key's type annotation.

An unknown key or a value of the wrong type is a one-line `ConfigError` naming the source and the dotted
key; an unknown key gets a hint (a near spelling, a look-alike non-ASCII letter).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal

from .schema import Config, ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)` for a one-line message: at most `limit` characters (a hostile value may be huge, or an
    integer too long for Python to print)."""
    try:
        text = repr(value) if not isinstance(value, (list, dict)) else reprlib.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}: expected one of {allowed}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__} {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__} {_show(value)}")
        return {
            _coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: refused with the ranges (load_config)
            return math.inf
    if tp is str:
        if not isinstance(value, str):
            hint = " (write it in quotes to mean the text)" if isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{source}: {key}: expected a string, got {_show(value)}{hint}")
        if "\x00" in value:
            raise ConfigError(f"{source}: {key}: must not contain a NUL byte, got {_show(value)}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown_key_hint(key: Any, fields: dict[str, Any]) -> str:
    """What an unknown key probably meant: a look-alike non-ASCII letter, a near spelling."""
    import difflib
    import unicodedata

    text = str(key) if isinstance(key, str) else ""
    odd = next((c for c in text if not c.isascii() or not c.isprintable()), None)
    near = difflib.get_close_matches(text, list(fields), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    if odd is not None:
        name = unicodedata.name(odd, "a control character")
        hint += f" (it contains U+{ord(odd):04X} {name}, which is not an ASCII letter)"
    return hint


def _build(cls: type, values: Any, prefix: str, source: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        where = prefix or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(values).__name__} {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {_show(dotted, 80)}{_unknown_key_hint(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], source: str = "<checkpoint>") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = _build(Config, values, "", source)
    cfg.source = source
    return cfg
