"""Expand a sweep into cells and find each cell's directory and status without running it.

Hydra composes a config in about 0.13 s, so composing every cell of a 500-cell sweep just to
learn that it is finished would cost a minute. Here a config is composed once per distinct
combination of config-group choices (model × sparse × benchmark, usually a handful); every
other override is a plain value applied to a copy of that composed dict, as Hydra applies it
(tests/unit/launch/test_plan.py checks this against Hydra's own composition). Benchmarks expand into one
cell per subset. `identify` then validates every cell and computes its directory, once; the
cell's job gets it as `cell=<model>/<sparse>/<benchmark>/<subset>/<key>` and checks it.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sa_bench.config import ConfigError
from sa_bench.launch import jobdir
from sa_bench.launch.identity import Inputs, job_relpath, sanitize
from sa_bench.launch.jobdir import Status
from sa_bench.models.identity import weights_identity
from sa_bench.spec import JobSpec


@dataclass
class Cell:
    overrides: list[str]
    """Hydra override strings that make this cell's job."""
    config: dict
    """The resolved config (without the hydra node), as the job itself will see it."""
    relpath: str = ""
    """`<model>/<sparse>/<benchmark>/<subset>/<key>`, set by `identify`."""
    key: str = ""
    path: Path = Path()
    status: Status = Status.PENDING
    error: str = ""
    """Why the cell's config is invalid (status INVALID)."""


@dataclass
class Choice:
    """One value of one override: the string handed to Hydra and the parsed Python value."""

    key: str
    text: str
    value: Any
    kind: str  # set | add | force_add | delete
    is_group: bool

    @property
    def override(self) -> str:
        if self.kind == "delete" and not self.text:
            return f"~{self.key}"
        prefix = {"set": "", "add": "+", "force_add": "++", "delete": "~"}[self.kind]
        return f"{prefix}{self.key}={self.text}"


def choices_of(override: Any, groups: set[str]) -> list[Choice]:
    """All values of a parsed Hydra override (one for a plain override, n for a sweep)."""
    kind = (
        "delete" if override.is_delete() else "add" if override.is_add()
        else "force_add" if override.is_force_add() else "set"
    )
    key = override.get_key_element().lstrip("~+")
    is_group = override.key_or_group in groups or "/" in override.key_or_group
    if override.is_sweep_override():
        if not override.is_discrete_sweep():
            raise ConfigError(f"{key}: only discrete sweeps (a,b,c or range) are supported")
        texts = list(override.sweep_string_iterator())
        values = list(override.sweep_iterator())
        return [Choice(key, t, v, kind, is_group) for t, v in zip(texts, values, strict=True)]
    value = override.value()
    text = "" if kind == "delete" and value is None else override.get_value_element_as_str()
    return [Choice(key, text, value, kind, is_group)]


def apply_value(cfg: dict, choice: Choice) -> None:
    """Apply a value override to a plain dict the way Hydra applies it to the config."""
    *parents, last = choice.key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            if choice.kind in ("add", "force_add") and isinstance(node, dict):
                node = node.setdefault(part, {})
                continue
            raise ConfigError(_unknown(choice, ".".join(parents[: i + 1])))
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(_unknown(choice, choice.key))
    if choice.kind == "delete":  # Hydra: a null value counts as absent; `~k=v` checks v
        if node.get(last) is None:
            raise ConfigError(f"{choice.key}: cannot delete, no such key (or it is null)")
        if choice.value is not None and choice.value != node[last]:
            raise ConfigError(f"{choice.key}: cannot delete, its value is {node[last]!r}, "
                              f"not {choice.value!r}")
        del node[last]
        return
    if last not in node and choice.kind == "set":
        raise ConfigError(_unknown(choice, choice.key))
    if node.get(last) is not None and choice.kind == "add" and not isinstance(choice.value, (dict, list)):
        raise ConfigError(f"{choice.key}: already set; drop the '+' to override it")
    if isinstance(choice.value, dict) and isinstance(node.get(last), dict):
        _merge(node[last], copy.deepcopy(choice.value))
    else:
        node[last] = copy.deepcopy(choice.value)


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _unknown(choice: Choice, key: str) -> str:
    return (
        f"{key}: no such config key (from override '{choice.override}'); "
        f"check the spelling, or add a new key with '+{choice.key}=...'"
    )


def _has_interpolation(node: Any) -> bool:
    if isinstance(node, str):
        return "${" in node
    if isinstance(node, dict):
        return any(_has_interpolation(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_interpolation(v) for v in node)
    return False


def _resolve(cfg: dict) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # type: ignore[return-value]


def _as_override_value(value: Any) -> str:
    """Strings are always quoted, so `1024` or `true` as a subset name stays a string."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else str(value)


def expand(
    overrides: list[Any], groups: set[str], compose: Callable[[list[str]], dict]
) -> list[Cell]:
    """Every cell of the sweep, in sweep order, not yet identified (see `identify`);
    `compose(group_overrides)` gives Hydra's raw composed dict for the config-group choices."""
    per_override = [choices_of(o, groups) for o in overrides]
    group_idx = [i for i, c in enumerate(per_override) if c[0].is_group]
    value_idx = [i for i, c in enumerate(per_override) if not c[0].is_group]
    explicit_subset = any(per_override[i][0].key == "benchmark.subset" for i in value_idx)
    cells: list[Cell] = []
    for group_combo in itertools.product(*(per_override[i] for i in group_idx)):
        base = compose([c.override for c in group_combo])
        needs_resolve = _has_interpolation(base)
        for value_combo in itertools.product(*(per_override[i] for i in value_idx)):
            cfg = copy.deepcopy(base)
            for choice in value_combo:
                apply_value(cfg, choice)
            if needs_resolve or any(_has_interpolation(c.value) for c in value_combo):
                cfg = _resolve(cfg)
            strings = [c.override for c in (*group_combo, *value_combo)]
            bench = cfg.get("benchmark") or {}
            subsets = [bench.get("subset")] if explicit_subset else list(bench.get("subsets") or [None])
            for subset in subsets:
                cell_cfg = cfg
                cell_overrides = strings
                if not explicit_subset:
                    cell_cfg = {**cfg, "benchmark": {**bench, "subset": subset}}
                    cell_overrides = [*strings, f"++benchmark.subset={_as_override_value(subset)}"]
                cells.append(Cell(cell_overrides, cell_cfg))
    return cells


def identify(cells: list[Cell], inputs: Inputs) -> tuple[list[Cell], list[Cell]]:
    """Validate every cell and compute its directory, once; drop duplicates (two override
    lists naming the same cell). Returns the valid cells and the invalid ones (status
    INVALID, `error` set, `relpath` without a key)."""
    valid: list[Cell] = []
    invalid: list[Cell] = []
    seen: set[str] = set()
    weights: dict[str, str] = {}  # per distinct model section: its files are listed once
    for cell in cells:
        try:
            spec = JobSpec.from_dict(cell.config)
        except ConfigError as exc:
            cell.status, cell.error = Status.INVALID, str(exc)
            cell.relpath = "/".join(sanitize(_name(cell.config, s)) for s in ("model", "sparse", "benchmark"))
            cell.relpath += "/" + sanitize(_name(cell.config, "benchmark", "subset"))
            invalid.append(cell)
            continue
        model = json.dumps(cell.config.get("model"), sort_keys=True, default=str)
        if model not in weights:
            weights[model] = weights_identity(spec.model, inputs.offline, inputs.cache)
        rel = job_relpath(spec, inputs, weights[model])
        if rel in seen:
            continue
        seen.add(rel)
        cell.relpath, cell.key = rel, rel.rsplit("/", 1)[1]
        cell.path = output_root(cell.config) / rel
        cell.overrides = [*cell.overrides, f"++cell={_as_override_value(rel)}"]
        valid.append(cell)
    return valid, invalid


def output_root(config: dict) -> Path:
    """`output_root` as given, `~` expanded (as every other path setting)."""
    return Path(str(config.get("output_root", "outputs"))).expanduser()


def _name(cfg: dict, section: str, key: str = "name") -> str:
    node = cfg.get(section)
    return str(node.get(key)) if isinstance(node, dict) else "?"


def refresh_status(cells: list[Cell]) -> None:
    for cell in cells:
        cell.status = jobdir.status(cell.path, cell.key)


def plan_table(cells: list[Cell]) -> str:
    """One line per cell: status, directory, and the first error line of a failure."""
    lines = []
    for cell in cells:
        line = f"  {cell.status:8s} {cell.path}"
        if cell.status == Status.FAILED:
            line += f"\n           {jobdir.first_error_line(cell.path)}"
        if cell.status == Status.INVALID:
            line = f"  {cell.status:8s} {cell.relpath}\n           {cell.error}"
        lines.append(line)
    return "\n".join(lines)

