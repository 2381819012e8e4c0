"""Loading a run config: a YAML file plus dotted `--set` overrides, checked into the
dataclasses of megatrain/config/schema.py.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.max_steps=50", "parallel.zero_stage=3"])

Unknown keys and wrong types fail with the dotted key, where it came from (file or --set)
and the closest valid key; then every section checks its own fields (`problems`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatrain.config.schema import Config
from megatrain.errors import UserError


def _hints(cls) -> dict:
    """The type of each field (class variables are not keys)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in fields}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def _closest(key: str) -> str:
    """The valid key a typo most likely meant: a close sibling, the same name under
    another section (train.lr -> optim.lr), or the closest dotted key."""
    keys = _all_keys(Config)
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    match = match or [k for k in keys if k.rpartition(".")[2] == leaf][:1]
    match = match or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, dict):
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """`value` checked against the annotation `tp` (a UserError naming the key if it does
    not fit); numbers written as strings ("6e-4", which YAML reads as a string) are
    accepted for numeric fields."""
    try:
        return _check(value, tp)
    except _Mismatch:
        raise UserError(
            f"{source}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        ) from None


def _check(value: Any, tp) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(_Mismatch):
                return _check(value, arg)
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:  # list[X]: every item an X
        if isinstance(value, list):
            return [_check(v, args[0]) for v in value]
    elif origin is dict:  # dict[K, V]
        if isinstance(value, dict):
            return {_check(k, args[0]): _check(v, args[1]) for k, v in value.items()}
    elif tp in (int, float):
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.replace("_", ""))
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            if tp is float or float(number) == int(number):
                return tp(number)
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(value, tp):  # bool, str, dict, list
        return value
    raise _Mismatch


def _source_of(key: str, sources: dict) -> str:
    """Where a key came from: its --set override (or one below it), else the file."""
    if key in sources:
        return sources[key]
    return next((s for k, s in sources.items() if k.startswith(key + ".")), sources[""])


def _build(cls, raw: dict, prefix: str, sources: dict) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        raise UserError(
            f"{_source_of(section, sources)}: {section} must be a mapping, got {type(raw).__name__}"
        )
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        source = _source_of(key, sources)
        if name not in names:
            raise UserError(f"{source}: unknown key '{key}'{_closest(key)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", sources)
        else:
            kwargs[name] = _coerce(value, tp, key, source)
    return cls(**kwargs)


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in raw.items():
        keys.append(prefix + str(name))
        if isinstance(value, dict) and not prefix and dataclasses.is_dataclass(_hints(Config).get(name)):
            keys.extend(_dotted_keys(value, f"{prefix}{name}."))
    return keys


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when path is None), apply `key=value`
    overrides (values parsed as YAML), validate."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the config must be a mapping of sections, not {type(raw).__name__}")
    sources = {"": source}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. train.max_steps=50")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key, value)
        sources[key] = f"--set {key}"
    cfg = _build(Config, raw, "", sources)
    cfg.explicit_keys = frozenset(_dotted_keys(raw))
    for key, message in cfg.problems():  # the first problem, as one line
        raise UserError(f"{source}: {key} {message}")
    return cfg
