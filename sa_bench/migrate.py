"""Re-key result trees written by earlier key schemes, so their finished cells are found done.

    python -m sa_bench.migrate OUTPUT_ROOT [--dry-run]

Old formats are read here, and only here (readers of today's trees know one format):
- scheme 1: the key was a hash of the raw resolved config dict minus run settings (with or
  without `benchmark.subsets`);
- scheme 2: the key was a hash of the validated config, but with maskers in name order,
  classes by name only, files over 4 MiB hashed by their first and last MiB, `auto` dtype and
  kernel unresolved, and the data fingerprint in `done.json` instead of the key.

A finished cell moves to its key of today (`sa_bench.launch.identity`) when its `done.json`
holds the old key of its own `config.yaml` recomputed now (so its config, weights and code
defaults are as they were) and, for local data, the data fingerprint it recorded still
matches the files. The device its jobs ran on (`env.json`) resolves `auto` dtype and kernel.
A cell that does not qualify is left where it is and listed: it runs again under its new key.
A migrated marker gets `schema` = `SCHEMA`, as every marker written today.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from sa_bench.config import ConfigError
from sa_bench.fingerprint import CACHE_FILE, FingerprintCache
from sa_bench.launch import identity, jobdir
from sa_bench.models.identity import model_files
from sa_bench.spec import JobSpec

SCHEMA = jobdir.SCHEMA

_LEGACY_TOP = ("output_root", "overwrite", "plan", "pool", "hydra", "cell")
_LEGACY_SUB = (("benchmark", "data_dir"), ("benchmark", "data_files"), ("benchmark", "subsets"))


def scheme1_key(cfg: dict, with_subsets: bool = False) -> str:
    """Hash of the raw config dict minus run settings (`with_subsets`: as before 36e23ba)."""
    values = {k: v for k, v in cfg.items() if k not in _LEGACY_TOP}
    for section, key in _LEGACY_SUB:
        if with_subsets and key == "subsets":
            continue
        if isinstance(values.get(section), dict) and key in values[section]:
            values[section] = {k: v for k, v in values[section].items() if k != key}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _partial_hash(file: Path) -> str:
    """Scheme 2's file hash: whole up to 4 MiB, else the first and last MiB."""
    size = file.stat().st_size
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if size <= 4 << 20:
            digest.update(f.read())
        else:
            digest.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _scheme2_files(files: list[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(base).as_posix()
        digest.update(f"{name}:{file.stat().st_size}:{_partial_hash(file)}\n".encode())
    return digest.hexdigest()[:16]


def _scheme2_canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = getattr(type(value), "key_name", None) or type(value).__name__
        recorded = identity.recorded_defaults().get(name, {})
        out: dict[str, Any] = {"@": name}
        if getattr(type(value), "key_version", 1) != 1:
            out["@v"] = type(value).key_version
        for f in dataclasses.fields(value):
            if not f.init:
                resolved = getattr(value, f.name, None)
                if isinstance(resolved, Path) and resolved.is_file():
                    out[f"{f.name.lstrip('_')}:content"] = _scheme2_files([resolved], resolved.parent)
                continue
            v = _scheme2_canonical(getattr(value, f.name))
            if not (f.name in recorded and recorded[f.name] == v):
                out[f.name] = v
        return out
    if isinstance(value, dict):
        return {str(k): _scheme2_canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scheme2_canonical(v) for v in value]
    return value


def _scheme2_weights(model: Any, offline: bool) -> str:
    source = model.source()
    if source in ("embedded", "local"):
        folder = Path(model.resolved_path())
        return f"{source}:{_scheme2_files(model_files(folder), folder)}"
    if offline and model.offline_fallback:
        from sa_bench.models.loading import OFFLINE_FALLBACKS

        fallback = OFFLINE_FALLBACKS[model.offline_fallback]()
        if fallback is not None:
            return f"fallback:{model.offline_fallback}:{_scheme2_files(model_files(Path(fallback)), Path(fallback))}"
    return f"hub:{model.pretrained}@{model.revision or 'main'}"


def scheme2_key(spec: JobSpec, offline: bool) -> str:
    top = {k: v for k, v in _scheme2_canonical(spec).items()
           if k not in identity.NON_RESULT_FIELDS["JobSpec"] | {"model", "sparse", "benchmark"}}
    sparse = {k: v for k, v in _scheme2_canonical(spec.sparse.config).items() if k != "maskers"}
    sparse["maskers"] = {name: _scheme2_canonical(m) for name, m in spec.sparse.maskers.items()}
    bench = {k: v for k, v in _scheme2_canonical(spec.benchmark).items()
             if k not in identity.NON_RESULT_FIELDS["benchmark"]}
    values = {**top, "model": _scheme2_canonical(spec.model),
              "weights": _scheme2_weights(spec.model, offline), "sparse": sparse, "benchmark": bench}
    return identity.digest(values)


def _scheme2_data(bench: Any) -> str | None:
    """The data fingerprint scheme 2 recorded in `done.json` for these files now."""
    if bench.data_files:
        file = Path(bench.data_files).expanduser()
        return _scheme2_files([file], file.parent) if file.is_file() else "missing"
    if not bench.data_dir:
        return None
    folder = Path(bench.data_dir).expanduser()
    named = bench.data_dir_files()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if named is None else \
        [Path(f) for f in named if Path(f).is_file()]
    return _scheme2_files(files, folder) if files else None


RESOLVED = ("dtype", "attn_implementation")
"""Model fields keyed by their resolved value: checked against what the job recorded."""


def _filled_by_code(values: Any, raw: Any, top: bool = True) -> list[str]:
    """Dotted names of identity fields the raw scheme-1 config lacks: such a cell ran with
    the behaviour of its time, not today's default (e.g. LooGLE's repetition penalty)."""
    if not (isinstance(values, dict) and isinstance(raw, dict)):
        return []
    missing = []
    for name, value in values.items():
        if name.startswith("@") or ":" in name or name in ("weights", "data"):
            continue
        if not top and name in RESOLVED and isinstance(values.get("@"), str) and values["@"] == "ModelConfig":
            continue
        if name not in raw:
            missing.append(name)
        else:
            missing += [f"{name}.{sub}" for sub in _filled_by_code(value, raw[name], top=False)]
    return missing


def plan_move(cell: Path, cache: FingerprintCache) -> tuple[str | None, str]:
    """(new key, how) for a finished cell of an earlier scheme, or (None, why not)."""
    marker = jobdir.read_json(cell / jobdir.MARKER)
    if not isinstance(marker, dict):
        return None, "unreadable done.json"
    if not (cell / jobdir.METRICS).is_file():
        return None, "no metrics.json: not a finished result"
    if marker.get("schema") == SCHEMA:
        return None, "current"
    try:
        cfg = yaml.safe_load((cell / jobdir.CONFIG).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return None, f"unreadable config.yaml ({exc})"
    if not isinstance(cfg, dict):
        return None, "config.yaml is not a mapping"
    try:
        spec = JobSpec.from_dict({k: v for k, v in cfg.items() if k != "hydra"})
    except ConfigError as exc:
        return None, f"its config is not valid today ({exc})"
    env = jobdir.read_json(cell / jobdir.ENV)
    env = env if isinstance(env, dict) else {}
    model_source = env.get("model_source") if isinstance(env.get("model_source"), dict) else {}
    offline = str(model_source.get("source", "")).startswith("offline_fallback")
    device = "cuda" if "cuda" in str(env.get("device", "")).lower() else "cpu"
    inputs = identity.Inputs(device, offline, cache)
    values = identity.identity_values(spec, inputs)
    old = marker.get("key")
    if old in (scheme1_key(cfg), scheme1_key(cfg, with_subsets=True)):
        missing = _filled_by_code(values, cfg)
        if missing:
            return None, f"scheme 1, but it ran without {missing[0]} (now in the key)"
        how = "scheme 1"
    elif old == scheme2_key(spec, offline):
        how = "scheme 2"
    else:
        return None, "its key is not its config's under any earlier scheme (changed since?)"
    stats = jobdir.read_json(cell / jobdir.STATS)
    kernel = (stats.get("attention") or {}).get("implementation") if isinstance(stats, dict) else None
    if kernel is not None and kernel != values["model"]["attn_implementation"]:
        return None, f"it ran on the {kernel} kernel, not {values['model']['attn_implementation']}"
    summary = marker.get("summary") if isinstance(marker.get("summary"), dict) else {}
    if "data" in summary and summary["data"] != _scheme2_data(spec.benchmark):
        return None, "its local data files changed since it ran"
    return identity.digest(values), how


def migrate(root: Path, dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Move every finished cell of an earlier scheme under `root`; (moved, left) lines."""
    cache = FingerprintCache.in_root(root)
    moved, left = [], []
    for marker in sorted(root.rglob(jobdir.MARKER)):
        cell = marker.parent
        if CACHE_FILE.parts[0] in cell.relative_to(root).parts:
            continue
        key, how = plan_move(cell, cache)
        if key is None:
            if how != "current":
                left.append(f"left   {cell}: {how}")
            continue
        target = cell.parent / key
        if target.exists() and target != cell:
            left.append(f"left   {cell}: {target} exists already")
            continue
        if not dry_run:
            if target != cell:
                os.rename(cell, target)
            data = jobdir.read_json(target / jobdir.MARKER)
            if not isinstance(data.get("files"), dict):  # written before markers listed them
                data["files"] = {name: (target / name).stat().st_size
                                 for name in jobdir.OUTPUT_FILES if (target / name).is_file()}
            data.update(key=key, schema=SCHEMA, migrated_from=cell.name)
            jobdir.write_json_atomic(target / jobdir.MARKER, data)
        moved.append(f"moved  {cell} -> {key} ({how})")
    if not dry_run:
        cache.save()
    return moved, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_root", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="say what would move, move nothing")
    args = parser.parse_args()
    if not args.output_root.is_dir():
        raise SystemExit(f"output_root: {args.output_root} is not a directory")
    moved, left = migrate(args.output_root, args.dry_run)
    for line in moved + left:
        print(line)
    verb = "would move" if args.dry_run else "moved"
    print(f"{len(moved)} finished cells {verb} to today's keys, {len(left)} left (they run again)")


if __name__ == "__main__":
    main()
