"""Recording the defaults of config fields, so a new option keeps every existing job key.

    python -m sa_bench.launch.key_defaults            # list fields whose default is not recorded
    python -m sa_bench.launch.key_defaults --record   # append them to key_defaults.json

A field whose value equals its recorded default is left out of a job's key
(`sa_bench.launch.identity.canonical`); recorded defaults never change, so changing a default
in code changes the key of every cell that uses it. A test fails until new fields are recorded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

from sa_bench.attention.method import SparseConfig
from sa_bench.config import import_target
from sa_bench.launch import identity
from sa_bench.launch.hydra_app import CONF_DIR
from sa_bench.models.loading import ModelConfig
from sa_bench.spec import JobSpec


def config_classes() -> list[type]:
    """Every config dataclass of the package: the fixed sections and every `_target_` in conf/."""
    roots: list[type] = [JobSpec, ModelConfig, SparseConfig]
    targets = re.compile(r"_target_:\s*(sa_bench\.[A-Za-z0-9_.]+)")
    for file in sorted(Path(CONF_DIR).rglob("*.yaml")):
        roots += [import_target(t, str(file)) for t in targets.findall(file.read_text())]
    ordered: dict[str, type] = {}

    def visit(cls: type) -> None:  # nested dataclasses first: their defaults shape the outer
        if not dataclasses.is_dataclass(cls) or identity.class_id(cls) in ordered:
            return
        for hint in typing.get_type_hints(cls).values():
            for tp in (hint, *typing.get_args(hint)):
                if isinstance(tp, type):
                    visit(tp)
        ordered[identity.class_id(cls)] = cls

    for cls in sorted(roots, key=identity.class_id):
        visit(cls)
    return list(ordered.values())


def current_defaults(cls: type) -> dict[str, Any]:
    """{field: canonical default} for the init fields of `cls` that have a default, and the
    content of the package files it reads (`identity.SHIPPED`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = identity.canonical(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = identity.canonical(f.default_factory())
    shipped = identity.shipped_content(cls)
    if shipped is not None:
        out[identity.SHIPPED] = shipped
    return out


def missing_records(classes: list[type] | None = None) -> dict[str, dict[str, Any]]:
    """Fields with a default that `key_defaults.json` does not record yet."""
    recorded = identity.recorded_defaults()
    missing: dict[str, dict[str, Any]] = {}
    for cls in config_classes() if classes is None else classes:
        name = identity.class_id(cls)
        new = {k: v for k, v in current_defaults(cls).items() if k not in recorded.get(name, {})}
        if new:
            missing[name] = new
    return missing


def record_missing() -> dict[str, dict[str, Any]]:
    """Append the defaults of new fields to `key_defaults.json`; recorded ones never change."""
    added = missing_records()
    if added:
        recorded = identity.recorded_defaults()
        data = {**recorded, **{name: {**recorded.get(name, {}), **new} for name, new in added.items()}}
        identity.KEY_DEFAULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        identity.recorded_defaults.cache_clear()
    return added


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true",
                        help="append the defaults of fields not yet recorded to key_defaults.json")
    args = parser.parse_args()
    missing = record_missing() if args.record else missing_records()
    verb = "recorded" if args.record else "not recorded (run with --record)"
    for name, fields in missing.items():
        for field_name, default in fields.items():
            print(f"{verb}: {name}.{field_name} = {json.dumps(default)}")
    if not missing:
        print("every config field's default is recorded")


if __name__ == "__main__":
    main()
