"""Typed trees from YAML: build a tree of dataclasses from a mapping and dotted overrides,
checking every leaf against its annotation, with one-line errors naming the field.

The generic machinery behind `sagan.config` (whose schema is the model/data/train/eval config)
and `pipelines.config` (which adds the runner's sections); it knows no field names.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sagan.errors import one_line


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted field and says what is allowed."""


# A config tree has ~70 leaves; a YAML file whose aliases expand to more values than this is an
# "alias bomb" (a few lines, billions of values once copied) and is refused before the copy.
MAX_CONFIG_VALUES = 100_000
_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def quote(text: Any) -> str:
    """'text' as typed, unless it holds a line break or control character (then its escaped
    repr), cut to 200 characters: error messages stay one readable line."""
    text = str(text)
    if text.isprintable() and "'" not in text:
        return f"'{text[:200]}{'...' if len(text) > 200 else ''}'"
    return repr(text[:200]) + ("..." if len(text) > 200 else "")


def _short(value: Any) -> str:
    """Bounded repr for error messages: a value built from YAML aliases can be huge (and a
    plain repr of it would never return)."""
    return _REPR.repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert one leaf value against its annotation; raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], name)
        for tp_i in inner:  # e.g. `int | list[int]`: the first member that accepts the value
            try:
                return _coerce(value, tp_i, name)
            except ConfigError:
                continue
        raise ConfigError(f"config field '{name}': expected "
                          f"{' or '.join(_type_name(a) for a in inner)}, got {_short(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field '{name}': expected a list, got {_short(value)}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{name}': expected true/false, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field '{name}': expected an integer, got {_short(value)}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # nan/inf (`.nan`, `.inf`, "1e400") would turn a learning rate into a NaN loss later
        raise ConfigError(f"config field '{name}': expected a finite number, got {_short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{name}': expected a string, got {_short(value)}")
    raise ConfigError(f"config field '{name}': unsupported type {_type_name(tp)}")


def build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigError(f"config section {quote(where)}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"config: unknown key {quote(dotted)} "
                f"(valid keys here: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, data[f.name], dotted)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, dotted)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"config override {quote(item)}: expected KEY=VALUE, "
                          "e.g. train.lr_d=2e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config override {quote(item)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config override {quote(key)}: cannot parse value {raw[:200]!r} "
                          f"({one_line(exc)})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"config override {quote(key)}: value nested too deeply") from None
    return key.split("."), value


def relocate(data: dict, moved: dict[str, str]) -> dict:
    """Move fields from their old dotted place to the new one (`moved`: old -> new)."""
    for old, new in moved.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        section = data.get(osec)
        if not isinstance(section, dict) or oname not in section:
            continue
        value, target = section.pop(oname), data.setdefault(nsec, {})
        if isinstance(target, dict):  # else the new section itself is refused when built
            if nname in target:
                raise ConfigError(f"config: {quote(old)} and {quote(new)} are the same field "
                                  f"(it moved); set only {quote(new)}")
            target[nname] = value
    return data


def apply_overrides(data: dict, overrides: list[str], moved: dict[str, str] | None = None
                    ) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) onto a nested dict, in order; a key in
    `moved` (old dotted name -> new) is applied at its new place."""
    for item in overrides:
        parts, value = _parse_override(item)
        parts = (moved or {}).get(".".join(parts), ".".join(parts)).split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config override {quote(item)}: {quote(part)} is not "
                                  "a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """The mapping in YAML file `path`; ConfigError (one line) for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}': not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}': invalid YAML ({one_line(exc)})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"config file '{p}': invalid YAML (nested too deeply)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{p}': not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}': top level must be a mapping")
    return data


def bounded_copy(data: Any, budget: list[int] | None = None) -> Any:
    """Copy of nested dicts/lists; ConfigError past MAX_CONFIG_VALUES values (alias bombs)."""
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"config: more than {MAX_CONFIG_VALUES} values (YAML aliases "
                          "expanding without bound?)")
    if isinstance(data, dict):
        return {k: bounded_copy(v, budget) for k, v in data.items()}
    if isinstance(data, list):
        return [bounded_copy(v, budget) for v in data]
    return data


def require(cond: bool, name: str, msg: str) -> None:
    """ConfigError "config field 'name': msg" unless `cond`."""
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")
