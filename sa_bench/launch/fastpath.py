"""Resume an all-finished sweep without starting Hydra.

Hydra's start-up and one config composition cost ~0.4 s, which dominates resuming a sweep
whose cells are all done. After planning, the sweeper records the sweep's cells (directory
and key) in a manifest named by a fingerprint of everything that decides the plan: the
command-line arguments, the working directory, the package version, and every config file
(path and content) in `conf/` and in any `hydra.searchpath` folder given on the command line,
with the value of every environment variable those files read through `${oc.env:...}`. The
next identical command reads that manifest; if every listed cell is still done it prints the
usual line and stops. Whenever the fingerprint might miss a change (an interpolation on the
command line, a resolver whose value it cannot know, a search path set inside a config file,
an option it does not understand) it gives up and the normal Hydra path runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import sa_bench
from sa_bench.launch import jobdir
from sa_bench.launch.hydra_app import CONF_DIR  # the installed tree, in a wheel too

_SEARCHPATH = re.compile(r"file://([^,\]'\"]+)")
_RESOLVER = re.compile(r"\$\{\s*([\w.]+)\s*:([^,}]*)")
DETERMINISTIC_RESOLVERS = ("oc.select", "oc.create", "oc.decode", "oc.deprecated",
                           "oc.dict.keys", "oc.dict.values", "hydra")
"""Resolvers whose value follows from the config files, the arguments and the working dir."""


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The overrides, or None when the command is not a plain sweep we can vouch for."""
    args = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        return None  # --help, --cfg, --config-dir, ...
    if any("${" in a for a in args):
        return None  # resolved later (environment variables, other keys): cannot vouch
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
    dirs = [CONF_DIR] + [Path(p) for a in args if a.lstrip("+").startswith("hydra.searchpath")
                         for p in _SEARCHPATH.findall(a)]
    if not all(folder.is_dir() for folder in dirs):
        return None
    for folder in dirs:
        for file in sorted(folder.rglob("*.yaml")):
            text = file.read_bytes()
            if not _fingerprint_file(digest, file, text.decode("utf-8", "replace")):
                return None
            digest.update(text)
    for file in _package_files():  # code defaults and embedded weights are part of job keys
        st = file.stat()
        digest.update(f"{file}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return root / ".sa_bench" / "sweeps" / f"{digest.hexdigest()[:20]}.json"


def _package_files() -> list[Path]:
    package = Path(sa_bench.__file__).resolve().parent
    return sorted(p for suffix in ("*.py", "*.json", "*.safetensors")
                  for p in package.rglob(suffix) if p.parent.name != "conf")


def _fingerprint_file(digest: Any, file: Path, text: str) -> bool:
    """Add what `file` reads from outside itself; False if that cannot be known here."""
    if "searchpath" in text:
        return False  # more config folders, named inside a config file
    digest.update(f"\0{file}\0".encode())
    for name, arg in _RESOLVER.findall(text):
        if name == "oc.env":
            var = arg.strip()
            digest.update(f"{var}={os.environ.get(var)}\0".encode())
        elif not (name in DETERMINISTIC_RESOLVERS or name.startswith("sa_bench_")):
            return False  # e.g. ${now:...}: a value this fingerprint cannot know
    return True


def write_manifest(argv: list[str], cells: list) -> None:
    path = manifest_path(argv)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        jobdir.write_json_atomic(path, {"cells": [[str(c.path), c.key, *(c.source or [])]
                                                  for c in cells]})
    except OSError:
        pass  # a read-only (or full) output root: resuming just takes the Hydra path


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

        # a manifest written before cells named their files holds [data_files, data_dir]
        if any(data_changed(Path(p), local_data_fingerprint(*source), source if len(source) == 3 else None)
               for p, source in sourced):
            return False  # local benchmark files changed since: the sweeper reruns those cells
    print(f"{len(cells)} jobs: {len(cells)} done (skipped), 0 to run", flush=True)
    return True
