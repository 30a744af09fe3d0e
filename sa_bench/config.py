"""Typed validation of config sections.

Every configurable class (a masker, a benchmark, the model settings) is a dataclass whose
fields are its YAML keys. `build` turns a plain dict into such a dataclass, checking names,
types and ranges, and raises `ConfigError` naming the full dotted key and what was expected.
It is cheap and imports nothing heavy, so a sweep validates every cell before any model loads.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import re
import sys
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

Size = Union[int, float]  # noqa: UP007  (identity-checked in _convert)
"""A budget: an int is a token count, a float in (0, 1] a fraction of the current keys."""


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def import_target(target: str, key: str, *, want_class: bool = False,
                  expected: str = "a class") -> Any:
    """Import `package.module.Name`; `key` names the config key for the error message.

    With `want_class`, a module not yet imported is first read without running it
    (`_static_lookup`): a name it binds to something other than a class (`this.s`) or does
    not bind at all is refused before the module's code runs.
    """
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}: expected a dotted path 'package.module.Class', got {target!r}")
    if want_class and module_name not in sys.modules:
        kind, detail = _static_lookup(module_name, attr)
        if kind == "no module":
            raise ConfigError(f"{key}: cannot import module {module_name!r} ({detail})")
        if kind == "missing":
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        if kind == "not a class":
            raise ConfigError(f"{key}: {target} is not a class ({detail}); expected the dotted "
                              f"path of {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None


_DYNAMIC = re.compile(r"\bglobals\s*\(|\bsetattr\s*\(|\bexec\s*\(|\bsys\.modules\b|\bvars\s*\(")
"""Source that may bind module names at run time: a name it does not bind visibly may exist."""

_LITERALS = (ast.Constant, ast.JoinedStr, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp,
             ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


@functools.cache
def _static_lookup(module_name: str, attr: str) -> tuple[str, str]:
    """What `module_name`'s source binds `attr` to, without running the module (its parent
    packages are imported to find it): ("no module", why), ("missing", ""), ("not a class",
    what it is), or ("unknown", "") when only importing can tell (a class, an imported or
    computed name, or no readable source). Cached: a sweep builds the same targets per cell."""
    try:
        spec = importlib.util.find_spec(module_name)
    except ImportError as exc:
        return "no module", str(exc)
    except ValueError:
        return "unknown", ""
    if spec is None:
        return "no module", f"No module named {module_name!r}"
    try:
        source = spec.loader.get_source(module_name) if spec.loader is not None else None
        tree = ast.parse(source) if source is not None else None
    except Exception:  # no source (compiled extension, frozen) or unparsable: import decides
        return "unknown", ""
    if tree is None:
        return "unknown", ""
    bindings = list(_bindings(tree.body, attr))
    if not bindings:
        dynamic = (re.search(rf"\b{re.escape(attr)}\b", source) or _DYNAMIC.search(source)
                   or any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
                          for n in ast.walk(tree))
                   or any(True for _ in _bindings(tree.body, "__getattr__")))
        return ("unknown", "") if dynamic else ("missing", "")
    if any(what is None for what in bindings):
        return "unknown", ""
    return "not a class", f"module {module_name} binds {attr} to {' and '.join(dict.fromkeys(bindings))}"


def _bindings(body: list[ast.stmt], attr: str) -> typing.Iterator[str | None]:
    """For each module-level statement in `body` (also inside if/try/for/while/with) that
    binds `attr`: what it certainly binds it to that is not a class ("a function", "a
    literal value"), or None (a class, or anything only running the code can tell)."""
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            yield None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            yield None if node.decorator_list else "a function"
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == attr for t in targets for n in ast.walk(t)):
                plain = all(isinstance(t, ast.Name) for t in targets)
                literal = plain and isinstance(node.value, _LITERALS)
                yield "a literal value" if literal else None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.partition(".")[0]) == attr for a in node.names):
                yield None
        elif isinstance(node, (ast.If, ast.Try, ast.For, ast.AsyncFor, ast.While, ast.With,
                               ast.AsyncWith)):
            if isinstance(node, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
                targets = ([node.target] if isinstance(node, (ast.For, ast.AsyncFor))
                           else [i.optional_vars for i in node.items if i.optional_vars])
                if any(isinstance(n, ast.Name) and n.id == attr for t in targets for n in ast.walk(t)):
                    yield None
            for part in ("body", "orelse", "finalbody"):
                yield from _bindings(getattr(node, part, []), attr)
            for handler in getattr(node, "handlers", []):
                if handler.name == attr:
                    yield None
                yield from _bindings(handler.body, attr)
        elif any(isinstance(n, ast.NamedExpr) and n.target.id == attr for n in ast.walk(node)):
            yield None


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


def _unquoted(value: Any) -> bool:
    """Whether `value` is what YAML / Hydra make of an unquoted `512`, `1.5` or `true`."""
    return isinstance(value, (int, float, bool))


def _as_written(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _quote_hint(key: str, value: Any, items: bool = False) -> str:
    """The error for a str given a number or bool, and how to quote it: for the key's value,
    or with `items` for a list of str (the whole list, each item quoted)."""
    values = list(value) if items else [value]
    bad = next(v for v in values if _unquoted(v))
    kind = "a bool" if isinstance(bad, bool) else "an int" if isinstance(bad, int) else "a float"
    quoted = [f"'{_as_written(v)}'" for v in values]
    override = f"{key}=[{','.join(quoted)}]" if items else f"{key}={quoted[0]}"
    return (f"expected a str, got {kind} {bad!r}: YAML and Hydra read an unquoted "
            f"{_as_written(bad)} as {kind}; quote it: {override} (in a shell: \"{override}\"; "
            f"in a YAML file: '{_as_written(bad)}')")


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
        if item_tp is str and any(map(_unquoted, value)):
            i = next(i for i, v in enumerate(value) if _unquoted(v))
            if all(isinstance(v, str) or _unquoted(v) for v in value):
                raise ConfigError(f"{key}[{i}]: {_quote_hint(key, value, items=True)}")
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
    if tp is str and _unquoted(value):
        raise ConfigError(f"{key}: {_quote_hint(key, value)}")
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
    expected = f"a {base.__name__} subclass" if base is not None else "a class"
    cls = import_target(data["_target_"], f"{key}._target_", want_class=True, expected=expected)
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_: {data['_target_']} is not a {base.__name__} subclass")
    return build(cls, data, key)
