"""Job identity: which config values name a cell, and where its directory is.

    <output_root>/<model>/<sparse>/<benchmark>/<subset>/<key>/

`<key>` hashes the canonical JSON of every value that can change a result. Values that only
say *how* or *where* a job runs (launcher, pool, output root, overwrite, data location) are
left out, so the same cell gets the same directory on every machine and under every launcher.
This module is pure Python on plain dicts: the sweeper calls it for every cell of a sweep.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

NON_RESULT_KEYS = ("output_root", "overwrite", "pool", "plan", "hydra")
"""Top-level config keys that never change a result."""

NON_RESULT_SUBKEYS = (
    ("benchmark", "data_dir"), ("benchmark", "data_files"), ("benchmark", "subsets"),
)
"""Nested keys that locate data or choose which cells run, rather than define a result
(a cell's own subset is `benchmark.subset`, which is part of the key)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def sanitize(name: Any) -> str:
    """A single safe path component: no separators, no leading dots, nothing a file system refuses."""
    text = _UNSAFE.sub("_", str(name)).strip("._") or "_"
    return text[:80]


def result_values(cfg: dict) -> dict:
    """The part of a resolved config that can change the result of a job."""
    values = {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    for section, key in NON_RESULT_SUBKEYS:
        if isinstance(values.get(section), dict) and key in values[section]:
            values[section] = {k: v for k, v in values[section].items() if k != key}
    return values


def job_key(cfg: dict) -> str:
    """Short stable hash of the canonical JSON of the result-affecting values."""
    canonical = json.dumps(result_values(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def job_relpath(cfg: dict) -> str:
    """`<model>/<sparse>/<benchmark>/<subset>/<key>` for a resolved config dict."""
    bench = cfg["benchmark"]
    parts = [cfg["model"]["name"], cfg["sparse"]["name"], bench["name"], bench.get("subset")]
    return "/".join(sanitize(p) for p in parts) + "/" + job_key(cfg)


def job_dir(cfg: dict) -> Path:
    return Path(cfg["output_root"]) / job_relpath(cfg)
