"""Typed validation of config sections.

Every configurable class (a masker, a benchmark, the model settings) is a dataclass whose
fields are its YAML keys. `build` turns a plain dict into such a dataclass, checking names,
types and ranges, and raises `ConfigError` naming the full dotted key and what was expected.
It is cheap and imports nothing heavy, so a sweep validates every cell before any model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

Size = Union[int, float]  # noqa: UP007  (identity-checked in _convert)
"""A budget: an int is a token count, a float in (0, 1] a fraction of the current keys."""


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def import_target(target: str, key: str) -> Any:
    """Import `package.module.Name`; `key` names the config key for the error message."""
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}: expected a dotted path 'package.module.Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None


def check_size(value: Any, key: str) -> Size:
    """Validate a budget: int >= 0 token count, or float fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{key}: expected an int token count or a float fraction in (0, 1], got {value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{key}: a token count must be >= 0, got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}: a fraction must be in (0, 1], got {value}")
    return value


def check_range(
    value: float, key: str, low: float | None = None, high: float | None = None,
    low_open: bool = False,
) -> None:
    """Raise ConfigError if `value` is outside [low, high] (or (low, high] with low_open)."""
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"{key}: expected a value {bound}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: expected a value <= {high}, got {value}")


def _type_name(tp: Any) -> str:
    if tp is Size:
        return "an int token count or a float fraction"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints become floats for float)."""
    if tp is Any:
        return value
    if tp is Size:
        return check_size(value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {tp.__name__}, got {value!r}")
        return value
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Evaluated once per class: a sweep validates hundreds of cells of the same classes."""
    return typing.get_type_hints(cls)


def build(cls: type[T], data: dict, key: str) -> T:
    """Build dataclass `cls` from `data`, naming `key.field` in every error.

    A `_target_` entry in `data` is ignored here (it chose `cls`). After construction the
    class's own `__post_init__` may raise ConfigError for range checks; it can use `self._key`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a mapping, got {data!r}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields) - {"_target_"})
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown key for {cls.__name__}; expected one of {sorted(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{key}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name}: missing required key ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if str(exc).startswith(key):
            raise
        raise ConfigError(f"{key}.{exc}") from None


def build_target(data: dict, key: str, base: type | None = None) -> Any:
    """Build the dataclass named by `data['_target_']`, checking it subclasses `base`."""
    if not isinstance(data, dict) or "_target_" not in data:
        raise ConfigError(f"{key}._target_: missing; expected the dotted path of a class")
    cls = import_target(data["_target_"], f"{key}._target_")
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_: {data['_target_']} is not a {base.__name__} subclass")
    return build(cls, data, key)
