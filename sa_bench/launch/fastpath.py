"""Resume an all-finished sweep without starting Hydra.

Hydra's start-up and one config composition cost ~0.4 s, which dominates resuming a sweep
whose cells are all done. After planning, the sweeper records the sweep's cells (directory
and key) in a manifest named by a fingerprint of everything that decides the plan: the
command-line arguments, the working directory, the package version, and every config file
(path, size, modification time) in `conf/` and in any `hydra.searchpath` folder given on the
command line. The next identical command reads that manifest; if every listed cell still has
its marker it prints the usual line and stops. Anything else (a changed file, an unfinished
cell, an option it does not understand) falls through to the normal Hydra path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import sa_bench
from sa_bench.launch import jobdir
from sa_bench.launch.hydra_app import CONF_DIR  # the installed tree, in a wheel too

_SEARCHPATH = re.compile(r"file://([^,\]]+)")


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The overrides, or None when the command is not a plain sweep we can vouch for."""
    args = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        return None  # --help, --cfg, --config-dir, ...
    if any(a.split("=", 1)[0].lstrip("+~") in ("plan", "overwrite") for a in args):
        return None
    if any(a.startswith("hydra.searchpath") and "pkg://" in a for a in args):
        return None  # config files inside a package: not fingerprinted here
    return args


def _output_root(args: list[str]) -> Path | None:
    root = "outputs"
    for a in args:
        if a.startswith("output_root="):
            root = a.split("=", 1)[1].strip("'\"")
    return None if "${" in root else Path(root)


def manifest_path(argv: list[str]) -> Path | None:
    args = _plain_overrides(argv)
    root = None if args is None else _output_root(args)
    if args is None or root is None:
        return None
    digest = hashlib.sha256(json.dumps([args, os.getcwd(), sa_bench.__version__]).encode())
    dirs = [CONF_DIR] + [Path(p) for a in args if a.startswith("hydra.searchpath")
                         for p in _SEARCHPATH.findall(a)]
    for folder in dirs:
        for file in sorted(folder.rglob("*.yaml")):
            st = file.stat()
            digest.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    for file in _package_files():  # code defaults and embedded weights are part of job keys
        st = file.stat()
        digest.update(f"{file}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return root / ".sa_bench" / "sweeps" / f"{digest.hexdigest()[:20]}.json"


def _package_files() -> list[Path]:
    package = Path(sa_bench.__file__).resolve().parent
    return sorted(p for suffix in ("*.py", "*.json", "*.safetensors")
                  for p in package.rglob(suffix) if p.parent.name != "conf")


def write_manifest(argv: list[str], cells: list) -> None:
    path = manifest_path(argv)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    jobdir.write_json_atomic(path, {"cells": [[str(c.path), c.key, *_data_source(c.config)]
                                              for c in cells]})


def _data_source(config: dict) -> list:
    """Where a cell's benchmark reads local files from (data_files, data_dir), or []."""
    bench = config.get("benchmark") or {}
    source = [bench.get("data_files"), bench.get("data_dir")]
    return source if any(source) else []


def resume_if_all_done(argv: list[str]) -> bool:
    """Print the plan line and return True if every cell of this exact sweep is finished."""
    path = manifest_path(argv)
    manifest = jobdir.read_json(path) if path is not None else None
    if not isinstance(manifest, dict) or not manifest.get("cells"):
        return False
    cells = manifest["cells"]
    if not all(jobdir.is_done(Path(p), key) for p, key, *_ in cells):
        return False
    sourced = [(p, source) for p, _, *source in cells if any(source)]
    if sourced:
        from sa_bench.launch.identity import data_changed, local_data_fingerprint

        if any(data_changed(Path(p), local_data_fingerprint(*source)) for p, source in sourced):
            return False  # local benchmark files changed since: the sweeper reruns those cells
    print(f"{len(cells)} jobs: {len(cells)} done (skipped), 0 to run", flush=True)
    return True
