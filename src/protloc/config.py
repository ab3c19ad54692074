"""Frozen dataclass configurations, YAML files and ``a.b=c`` overrides.

Every model and pipeline takes one frozen dataclass config. This module maps YAML files and
command-line overrides onto those dataclasses, strictly: an unknown key is an error that names the
key and suggests the nearest known one, and values are coerced to the field's declared type.

Examples
--------
>>> from dataclasses import dataclass, field
>>> @dataclass(frozen=True)
... class Optim:
...     lr: float = 4e-4
>>> @dataclass(frozen=True)
... class Run:
...     steps: int = 10
...     optim: Optim = field(default_factory=Optim)
>>> apply_overrides(Run(), ["optim.lr=1e-3", "steps=5"])
Run(steps=5, optim=Optim(lr=0.001))
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from protloc._fs import atomic_write_text
from protloc.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_yaml",
    "save_config",
]

T = TypeVar("T")


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that `from __future__ import annotations` makes.
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` (from YAML or a command line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: cannot interpret {value!r} as {tp}")
    if origin is typing.Literal:
        for arg in args:
            if value == arg or (isinstance(value, str) and str(arg) == value):
                return arg
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, _where=where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, _where: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, strictly.

    Parameters
    ----------
    cls
        A (frozen) dataclass type.
    data
        Nested mapping, e.g. parsed YAML. Missing keys take the dataclass defaults.

    Raises
    ------
    ConfigError
        On an unknown key (with a suggestion) or a value of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{_where}.{key}" if _where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r}{_suggest(str(key), fields)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{_where or cls.__name__}: {exc}") from exc


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a JSON/YAML-safe nested dict of a dataclass config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _check_path(cls: type, dotted: str) -> None:
    """Raise a ConfigError naming the first unknown component of ``dotted``."""
    cur: Any = cls
    seen = []
    for part in dotted.split("."):
        if not (isinstance(cur, type) and dataclasses.is_dataclass(cur)):
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(seen)} has no sub-keys")
        names = [f.name for f in dataclasses.fields(cur)]
        if part not in names:
            prefix = ".".join(seen)
            where = f"{prefix}.{part}" if prefix else part
            raise ConfigError(f"unknown config key {where!r}{_suggest(part, names)}")
        seen.append(part)
        cur = _field_types(cur)[part]
        # Optional[Dataclass] -> Dataclass
        args = [a for a in typing.get_args(cur) if a is not type(None)]
        if typing.get_origin(cur) in (typing.Union, types.UnionType) and len(args) == 1:
            cur = args[0]


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Return ``cfg`` with ``a.b=c`` overrides applied (values parsed as YAML scalars).

    Raises
    ------
    ConfigError
        For a malformed override, an unknown key or a value of the wrong type.
    """
    data = config_to_dict(cfg)
    cls = type(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_path(cls, key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key, value)
    return config_from_dict(cls, data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    *,
    base: T | None = None,
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Build a config: ``base`` (or the dataclass defaults), then a YAML file, then overrides.

    Parameters
    ----------
    cls
        The config dataclass.
    base
        Starting point, e.g. a preset such as ``CytoselfConfig.paper()``.
    path
        Optional YAML file whose keys replace those of ``base``.
    overrides
        ``a.b=c`` strings applied last.
    """
    data = config_to_dict(base if base is not None else cls())
    if path is not None:
        file_data = load_yaml(path)
        try:
            _deep_update(data, file_data, cls)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    cfg = config_from_dict(cls, data)
    return apply_overrides(cfg, overrides)


def _deep_update(dst: dict[str, Any], src: Mapping[str, Any], cls: type, prefix: str = "") -> None:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k, v in src.items():
        where = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {where!r}{_suggest(str(k), names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v, tp, where)
        else:
            dst[k] = v


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    p = Path(path)
    data = config_to_dict(cfg)
    if p.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    return atomic_write_text(p, text)
