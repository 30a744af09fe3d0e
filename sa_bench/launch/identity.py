"""Job identity: which values name a cell, and where its directory is.

    <output_root>/<model>/<sparse>/<benchmark>/<subset>/<key>/

`<key>` is a short hash of the canonical form of a cell's *validated* config (`JobSpec`):

- every init field of every config dataclass, so a default written only in code counts;
- the content of any file a dataclass resolved at validation into a non-init `Path` field
  (a method's fitted weights, `weights: auto`), not only the setting that names it;
- classes named by a stable name (`key_name` class attribute, else the class name), never
  by their module path, so moving a class or renaming a module keeps every key; a class
  whose results change meaning without any config change (a scorer fixed, a sampling rule
  replaced) raises its `key_version` class attribute, which changes the keys of its cells;
- a field whose value equals its *recorded* default (`key_defaults.json`, appended by
  `python -m sa_bench.launch.identity --record` when a field is added) is left out: a new
  option with a default keeps every existing key, while changing a default in code (the
  value no longer equals the recorded one) changes the key of every cell that uses it;
- the identity of the model's weights (`sa_bench.models.identity.weights_identity`).

Values that only say how, where or which cells run (pool, output root, overwrite, plan,
where the data lives, which subsets a sweep picks) are left out, so the same cell gets the
same directory on every machine and under every launcher.

Result trees written before this scheme (key = hash of the raw YAML) are re-keyed by
`migrate_legacy` when a sweep plans their cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sa_bench.spec import JobSpec

KEY_DEFAULTS = Path(__file__).resolve().parent / "key_defaults.json"

NON_RESULT_FIELDS: dict[str, set[str]] = {
    "JobSpec": {"pool", "overwrite", "cell"},
    "benchmark": {"data_dir", "data_files", "subsets"},
}
"""Fields that never change a result: by dataclass key name, or by section for benchmarks
(whose classes vary). A benchmark's own subset is `benchmark.subset`, which is in the key."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def sanitize(name: Any) -> str:
    """A single safe path component: no separators, no leading dots, nothing a file system refuses."""
    text = _UNSAFE.sub("_", str(name)).strip("._") or "_"
    return text[:80]


def key_name(cls: type) -> str:
    return getattr(cls, "key_name", None) or cls.__name__


@cache
def recorded_defaults() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(KEY_DEFAULTS.read_text())
    except FileNotFoundError:
        return {}


def canonical(value: Any, drop: set[str] | frozenset[str] = frozenset()) -> Any:
    """A JSON-able form of a config value; dataclasses become {"@": key_name, field: ...}."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = key_name(type(value))
        recorded = recorded_defaults().get(name, {})
        out: dict[str, Any] = {"@": name}
        version = getattr(type(value), "key_version", 1)
        if version != 1:  # the class's results changed meaning without a config change
            out["@v"] = version
        for f in dataclasses.fields(value):
            if f.name in drop:
                continue
            if not f.init:  # derived state; a file it resolved to (weights: auto) is read: its content counts
                resolved = getattr(value, f.name, None)
                if isinstance(resolved, Path) and resolved.is_file():
                    out[f"{f.name.lstrip('_')}:content"] = fingerprint_files([resolved], resolved.parent)
                continue
            v = canonical(getattr(value, f.name))
            if f.name in recorded and recorded[f.name] == v:
                continue
            out[f.name] = v
        return out
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} into a job key: {value!r}")


def identity_values(spec: JobSpec, weights: str | None = None) -> dict[str, Any]:
    """Everything that can change the result of the cell `spec` describes; `weights` is
    `weights_identity(spec.model)` when the caller already has it."""
    if weights is None:
        from sa_bench.models.identity import weights_identity

        weights = weights_identity(spec.model)
    top = canonical(spec, drop=NON_RESULT_FIELDS["JobSpec"] | {"model", "sparse", "benchmark"})
    sparse = canonical(spec.sparse.config, drop={"maskers"})
    sparse["maskers"] = {name: canonical(m) for name, m in spec.sparse.maskers.items()}
    return {
        **top,
        "model": canonical(spec.model),
        "weights": weights,
        "sparse": sparse,
        "benchmark": canonical(spec.benchmark, drop=NON_RESULT_FIELDS["benchmark"]),
    }


def _digest(values: Any) -> str:
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def job_key(spec: JobSpec, weights: str | None = None) -> str:
    """Short stable hash of the canonical identity of a validated cell."""
    return _digest(identity_values(spec, weights))


def job_relpath(spec: JobSpec, weights: str | None = None) -> str:
    """`<model>/<sparse>/<benchmark>/<subset>/<key>` of a validated cell."""
    bench = spec.benchmark
    parts = [spec.model.name, spec.sparse.config.name, bench.name, bench.subset]
    return "/".join(sanitize(p) for p in parts) + "/" + job_key(spec, weights)


# --- files: weights and benchmark data -------------------------------------------------------

_WHOLE = 4 << 20
_PART = 1 << 20


def fingerprint_files(files: list[Path], base: Path) -> str:
    """Hash of (name relative to `base`, size, content) of `files`; a file over 4 MiB is
    hashed by its first and last MiB. Modification times are left out: a copy of the same
    files on another machine has the same fingerprint."""
    digest = hashlib.sha256()
    for file in files:
        st = file.stat()
        name = file.relative_to(base).as_posix()
        content = _content_hash(str(file), st.st_size, st.st_mtime_ns)
        digest.update(f"{name}:{st.st_size}:{content}\n".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=4096)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """Cached per (path, size, mtime): a sweep reads each file once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE:
            digest.update(f.read())
        else:
            digest.update(f.read(_PART))
            f.seek(size - _PART)
            digest.update(f.read(_PART))
    return digest.hexdigest()[:16]


def data_source(benchmark: Any) -> list | None:
    """Where a cell reads local benchmark files: [data_files, data_dir, files] with `files` the
    files it reads from data_dir (`Benchmark.data_dir_files`; None = every file there), or
    None for hub or generated data. Stored in the sweep manifest for the resume fast path."""
    if not (benchmark.data_files or benchmark.data_dir):
        return None
    files = None if benchmark.data_files else benchmark.data_dir_files()
    return [benchmark.data_files, benchmark.data_dir,
            None if files is None else [str(f) for f in files]]


def data_fingerprint(benchmark: Any) -> str | None:
    """Fingerprint of the local files a cell reads (`data_files`, else its files in
    `data_dir`); None for hub or generated data. Not part of the key (the data location is
    not): recorded in `done.json` so a finished cell whose data changed is found and rerun."""
    source = data_source(benchmark)
    return None if source is None else local_data_fingerprint(*source)


def local_data_fingerprint(data_files: str | None, data_dir: str | None,
                           files: list[str] | None = None) -> str | None:
    """See `data_source`: `files` None fingerprints every file directly in `data_dir` (also
    the scheme of cells finished before benchmarks named their files)."""
    if data_files:
        file = Path(data_files).expanduser()
        return fingerprint_files([file], file.parent) if file.is_file() else "missing"
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            return "missing"
        if files is None:
            return fingerprint_files(sorted(p for p in folder.iterdir() if p.is_file()), folder)
        found = [f for f in (Path(name).expanduser() for name in files) if f.is_file()]
        return fingerprint_files(found, folder) if found else None
    return None


def same_data(recorded: str | None, data: str | None, source: list | None) -> bool:
    """Whether a recorded fingerprint is `data`'s. One recorded before benchmarks named the
    files they read covers every file in `data_dir`: it still matches while that folder is
    unchanged (so upgrading reruns nothing)."""
    if recorded == data:
        return True
    return bool(source and not source[0] and source[1] and source[2] is not None
                and recorded == local_data_fingerprint(None, source[1]))


def data_changed(path: Path, data: str | None, source: list | None = None) -> bool:
    """Whether the finished cell at `path` ran on other local data files than `data` says
    (`same_data`). A marker that recorded no fingerprint (written before they were) counts as
    unchanged."""
    from sa_bench.launch import jobdir

    marker = jobdir.read_json(path / jobdir.MARKER)
    summary = marker.get("summary") if isinstance(marker, dict) else None
    return isinstance(summary, dict) and "data" in summary and not same_data(
        summary["data"], data, source)


# --- result trees written by the raw-YAML scheme --------------------------------------------

_LEGACY_TOP = ("output_root", "overwrite", "pool", "plan", "hydra", "cell")
_LEGACY_SUB = (("benchmark", "data_dir"), ("benchmark", "data_files"), ("benchmark", "subsets"))


def legacy_key(cfg: dict, with_subsets: bool = False) -> str:
    """The key of the first scheme: a hash of the raw resolved config dict minus run settings
    (`with_subsets`: as written before commit 36e23ba, when `benchmark.subsets` was in it)."""
    values = {k: v for k, v in cfg.items() if k not in _LEGACY_TOP}
    for section, key in _LEGACY_SUB:
        if with_subsets and key == "subsets":
            continue
        if isinstance(values.get(section), dict) and key in values[section]:
            values[section] = {k: v for k, v in values[section].items() if k != key}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def migrate_legacy(path: Path, key: str) -> bool:
    """Re-key a finished legacy sibling of `path` that is this very cell; True if one moved.

    A sibling qualifies when its `done.json` holds the legacy key of its own `config.yaml`
    (so it is intact and of the old scheme) and that config, validated now, has `key` without
    a field that it did not set (`filled_by_code`). It is renamed to `path` and its marker rewritten. The weights of a migrated cell are taken to
    be the ones present now (the old scheme did not record them).
    """
    from sa_bench.config import ConfigError
    from sa_bench.launch import jobdir
    from sa_bench.spec import JobSpec

    try:
        siblings = [p for p in path.parent.iterdir() if p.name != path.name]
    except OSError:
        return False
    for old in siblings:
        marker = jobdir.read_json(old / jobdir.MARKER)
        if not isinstance(marker, dict):
            continue
        cfg = _read_yaml(old / jobdir.CONFIG)
        if cfg is None or marker.get("key") not in (legacy_key(cfg), legacy_key(cfg, True)):
            continue
        try:
            values = identity_values(JobSpec.from_dict(cfg))
        except (ConfigError, TypeError):
            continue
        if _digest(values) != key or filled_by_code(values, cfg):
            continue
        try:
            os.rename(old, path)  # fails if `path` exists and is not empty: then leave it
        except OSError:
            return False
        marker.update(key=key, migrated_from=old.name)
        jobdir.write_json_atomic(path / jobdir.MARKER, marker)
        return True
    return False


def filled_by_code(values: Any, raw: Any) -> list[str]:
    """Dotted names of the fields in the identity `values` that the raw config `raw` lacks.

    A legacy config that did not set a field which is now in the key (its value differs from
    the recorded default) ran with the behaviour of its time, not with today's default, so it
    is not this cell (e.g. LooGLE's repetition penalty, added with default 2.0)."""
    if not (isinstance(values, dict) and isinstance(raw, dict)):
        return []
    missing = []
    for name, value in values.items():
        if name.startswith("@") or ":" in name or name == "weights":
            continue
        if name not in raw:
            missing.append(name)
        else:
            missing += [f"{name}.{sub}" for sub in filled_by_code(value, raw[name])]
    return missing


def _read_yaml(file: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# --- recording defaults ------------------------------------------------------------------------

def config_classes() -> list[type]:
    """Every config dataclass of the package: the fixed sections and every `_target_` in conf/."""
    from sa_bench.attention.method import SparseConfig
    from sa_bench.config import import_target
    from sa_bench.launch.hydra_app import CONF_DIR
    from sa_bench.models.loading import ModelConfig
    from sa_bench.spec import JobSpec

    roots: list[type] = [JobSpec, ModelConfig, SparseConfig]
    targets = re.compile(r"_target_:\s*(sa_bench\.[A-Za-z0-9_.]+)")
    for file in sorted(Path(CONF_DIR).rglob("*.yaml")):
        roots += [import_target(t, str(file)) for t in targets.findall(file.read_text())]
    ordered: dict[str, type] = {}

    def visit(cls: type) -> None:  # nested dataclasses first: their defaults shape the outer
        if not dataclasses.is_dataclass(cls) or key_name(cls) in ordered:
            return
        for hint in typing.get_type_hints(cls).values():
            for tp in (hint, *typing.get_args(hint)):
                if isinstance(tp, type):
                    visit(tp)
        ordered[key_name(cls)] = cls

    for cls in sorted(roots, key=key_name):
        visit(cls)
    return list(ordered.values())


def current_defaults(cls: type) -> dict[str, Any]:
    """{field: canonical default} for the init fields of `cls` that have a default."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = canonical(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = canonical(f.default_factory())
    return out


def missing_records() -> dict[str, dict[str, Any]]:
    """Fields with a default that `key_defaults.json` does not record yet."""
    recorded = recorded_defaults()
    missing: dict[str, dict[str, Any]] = {}
    for cls in config_classes():
        name = key_name(cls)
        new = {k: v for k, v in current_defaults(cls).items() if k not in recorded.get(name, {})}
        if new:
            missing[name] = new
    return missing


def record_missing() -> dict[str, dict[str, Any]]:
    """Append the defaults of new fields to `key_defaults.json`; recorded ones never change."""
    added: dict[str, dict[str, Any]] = {}
    for cls in config_classes():  # one class at a time, nested ones first
        name = key_name(cls)
        recorded = recorded_defaults()
        new = {k: v for k, v in current_defaults(cls).items() if k not in recorded.get(name, {})}
        if not new:
            continue
        data = {**recorded, name: {**recorded.get(name, {}), **new}}
        KEY_DEFAULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        recorded_defaults.cache_clear()
        added[name] = new
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
