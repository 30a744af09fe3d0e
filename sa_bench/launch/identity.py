"""Job identity: which values name a cell, and where its directory is.

    <output_root>/<model>/<sparse>/<benchmark>/<subset>/<key>/

`<key>` is a short hash of the canonical form of a cell's *validated* config (`JobSpec`) and
of what it reads and runs on (`Inputs`):

- every init field of every config dataclass, so a default written only in code counts;
  a field whose value equals its *recorded* default (`key_defaults.json`, see
  `sa_bench.launch.key_defaults`) is left out, so a new option keeps every existing key while
  a changed code default changes the key of every cell that uses it;
- classes of this package by a stable name (`key_name` class attribute, else the class name)
  and `key_version`, so moving a class inside the package keeps its keys; any other class by
  its module and qualified name, with every field spelled out (a patched copy of a stock
  masker in a user's module is another method);
- the maskers in their order (each skips what the ones before it selected);
- the model's weights (`sa_bench.models.identity.weights_identity`), the content of a file a
  dataclass resolved into a non-init `Path` field (a method's fitted weights), and the content
  of the local benchmark files the cell reads: weights and data by their full content;
  hub data by `benchmark.revision`, as hub weights by `model.revision`;
- the content of the files shipped in this package that a class reads (`package_files`:
  LongBench's official prompts and lengths, the synthetic word lists), left out while it is
  the *recorded* content, as a default is, so editing such a file moves the cells that read it;
- the resolved dtype and attention kernel (`auto` means another thing on a GPU);
- equivalent spellings made one: the official generation length written out, a sample limit
  at or above the samples there are, a seed that no masker draws from, a masker that selects
  nothing, repeated or reordered dense layers, `main` as revision, the model's path (its
  weights identity names what is loaded).

Values that only say how, where or which cells run (pool, output root, overwrite, plan,
where the data lives, which subsets a sweep picks) are left out, so the same cell gets the
same directory on every machine and under every launcher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa_bench.fingerprint import FingerprintCache, data_fingerprint, fingerprint_files
from sa_bench.models.identity import resolved_dtype, resolved_kernel, weights_identity
from sa_bench.models.loading import offline_by_env

if TYPE_CHECKING:
    from sa_bench.spec import JobSpec

KEY_DEFAULTS = Path(__file__).resolve().parent / "key_defaults.json"
PACKAGE = "sa_bench."

NON_RESULT_FIELDS: dict[str, set[str]] = {
    "JobSpec": {"pool", "overwrite", "cell"},
    "benchmark": {"data_dir", "data_files", "subsets"},
}
"""Fields that never change a result: by dataclass key name, or by section for benchmarks
(whose classes vary). A benchmark's own subset is `benchmark.subset`, which is in the key."""

MODEL_LOCATION_FIELDS = {"pretrained", "revision", "offline_fallback"}
"""Where the weights come from: the weights identity says what is loaded instead."""

SHIPPED = "package_files:content"
"""The key of the shipped files' content, in a class's identity and its recorded defaults."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


@dataclass(frozen=True)
class Inputs:
    """What a cell's identity needs beyond its config, decided once per sweep (and again,
    the same way, by the job): the device kind its jobs run on, whether the hub is out of
    reach (an offline fallback is loaded instead), and where file hashes are cached."""

    device: str  # "cuda" or "cpu"
    offline: bool
    cache: FingerprintCache


def sanitize(name: Any) -> str:
    """A single safe path component: no separators, no leading dots, nothing a file system refuses."""
    text = _UNSAFE.sub("_", str(name)).strip("._") or "_"
    return text[:80]


def class_id(cls: type) -> str:
    """A class of this package by its stable name; any other by module and qualified name."""
    if cls.__module__.startswith(PACKAGE):
        return getattr(cls, "key_name", None) or cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


@cache
def recorded_defaults() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(KEY_DEFAULTS.read_text())
    except FileNotFoundError:
        return {}


def canonical(value: Any, cache: FingerprintCache | None = None,
              drop: set[str] | frozenset[str] = frozenset()) -> Any:
    """A JSON-able form of a config value; dataclasses become {"@": class_id, field: ...}.
    `cache` hashes the files that non-init `Path` fields resolved to (None: not allowed)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = class_id(type(value))
        recorded = recorded_defaults().get(name, {}) if type(value).__module__.startswith(PACKAGE) else {}
        out: dict[str, Any] = {"@": name}
        version = getattr(type(value), "key_version", 1)
        if version != 1:  # the class's results changed meaning without a config change
            out["@v"] = version
        fields = dataclasses.fields(value)
        if any(not f.init and isinstance(getattr(value, f.name, None), Path) for f in fields):
            # the file is keyed by its content: how it was named (auto, a path) does not count
            drop = set(drop) | set(getattr(type(value), "file_locators", ()))
        for f in fields:
            if f.name in drop:
                continue
            if not f.init:  # derived state; a file it resolved to (weights: auto) is read: its content counts
                resolved = getattr(value, f.name, None)
                if isinstance(resolved, Path) and resolved.is_file():
                    if cache is None:
                        raise TypeError(f"{name}.{f.name}: a file's content needs a fingerprint cache")
                    out[f"{f.name.lstrip('_')}:content"] = fingerprint_files([resolved], resolved.parent, cache)
                continue
            v = canonical(getattr(value, f.name), cache)
            if f.name in recorded and recorded[f.name] == v:
                continue
            out[f.name] = v
        shipped = shipped_content(type(value), cache)
        if shipped is not None and recorded.get(SHIPPED) != shipped:
            out[SHIPPED] = shipped
        return out
    if isinstance(value, dict):
        return {str(k): canonical(v, cache) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v, cache) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} into a job key: {value!r}")


def shipped_content(cls: type, cache: FingerprintCache | None = None) -> list[str] | None:
    """Content fingerprints of the package's files that `cls` reads (`package_files()`), or
    None when it reads none."""
    files = cls.package_files() if hasattr(cls, "package_files") else []
    if not files:
        return None
    cache = cache or FingerprintCache()
    return [fingerprint_files([f], f.parent, cache) for f in files]


def identity_values(spec: JobSpec, inputs: Inputs, weights: str | None = None) -> dict[str, Any]:
    """Everything that can change the result of the cell `spec` describes, canonical;
    `weights` is `weights_identity(spec.model, ...)` when the caller already has it."""
    top = canonical(spec, inputs.cache,
                    drop=NON_RESULT_FIELDS["JobSpec"] | {"model", "sparse", "benchmark"})
    if spec.max_new_tokens is not None and spec.max_new_tokens == _official_length(spec.benchmark):
        top.pop("max_new_tokens", None)
    return {
        **top,
        "model": _model_values(spec.model, inputs),
        "weights": weights or weights_identity(spec.model, inputs.offline, inputs.cache),
        "sparse": _sparse_values(spec.sparse, inputs.cache),
        "benchmark": _benchmark_values(spec.benchmark, inputs.cache),
    }


def _model_values(model: Any, inputs: Inputs) -> dict[str, Any]:
    values = canonical(model, inputs.cache, drop=MODEL_LOCATION_FIELDS)
    dtype = resolved_dtype(model, inputs.device)
    values["dtype"] = dtype
    values["attn_implementation"] = resolved_kernel(model, inputs.device, dtype)
    return values


def _sparse_values(method: Any, cache: FingerprintCache) -> dict[str, Any]:
    config = method.config
    maskers = [(name, m) for name, m in method.maskers.items() if not _selects_nothing(m)]
    values = canonical(config, cache, drop={"maskers", "dense_layers", "seed", "prefill", "compression"})
    layers = sorted(set(config.dense_layers))
    if layers:
        values["dense_layers"] = layers
    if any(getattr(m, "draws_random", False) for _, m in maskers) and config.seed != 0:
        values["seed"] = config.seed
    values["maskers"] = [[name, canonical(m, cache)] for name, m in maskers]
    if getattr(method, "prefill", None) is not None:  # the built method: defaults and class count
        values["prefill"] = canonical(method.prefill, cache)
    if getattr(method, "press", None) is not None:  # the built press: its defaults count
        values["compression"] = canonical(method.press, cache)
    return values


def _selects_nothing(masker: Any) -> bool:
    """A masker whose budget is zero tokens (e.g. `sink.size=0`) is the same as none."""
    budgets = getattr(masker, "budget_fields", ())
    return bool(budgets) and all(getattr(masker, f) == 0 for f in budgets)


def _benchmark_values(bench: Any, cache: FingerprintCache) -> dict[str, Any]:
    values = canonical(bench, cache, drop=NON_RESULT_FIELDS["benchmark"])
    n_samples = getattr(bench, "n_samples", None)
    if bench.max_samples is not None and n_samples is not None and bench.max_samples >= n_samples:
        values.pop("max_samples", None)  # every sample there is, as with no limit
    if values.get("revision") == "main":  # the hub dataset's default branch, as with none
        values.pop("revision")
    data = data_fingerprint(bench, cache)
    if data is not None:
        values["data"] = data
    return values


def _official_length(bench: Any) -> int | None:
    try:
        return int(bench.max_new_tokens())
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return None


def digest(values: Any) -> str:
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def job_key(spec: JobSpec, inputs: Inputs, weights: str | None = None) -> str:
    """Short stable hash of the canonical identity of a validated cell."""
    return digest(identity_values(spec, inputs, weights))


def job_relpath(spec: JobSpec, inputs: Inputs, weights: str | None = None) -> str:
    """`<model>/<sparse>/<benchmark>/<subset>/<key>` of a validated cell."""
    bench = spec.benchmark
    parts = [spec.model.name, spec.sparse.config.name, bench.name, bench.subset]
    return "/".join(sanitize(p) for p in parts) + "/" + job_key(spec, inputs, weights)


def local_inputs(pool: Any, output_root: str | Path) -> Inputs:
    """The inputs as a process sees them where it runs (a job, or a job started by hand):
    a GPU when its pool leases one, offline when the environment says so (a sweep that found
    the hub out of reach tells its jobs through HF_HUB_OFFLINE)."""
    device = "cuda" if pool.gpu_ids() and not pool.simulate else "cpu"
    return Inputs(device, offline_by_env(), FingerprintCache.in_root(output_root))
