"""Turn an output root into results tables, a CSV, plots and a status list.

    python -m sa_bench.report [output_root] [--model GLOB] [--method GLOB] [--benchmark GLOB]
                              [--out DIR] [--no-plots] [--format md,csv,json,html]

One table per benchmark: rows are model × sparse configuration, columns are the benchmark's
subsets plus their average (over that benchmark only). When the tree holds several
benchmarks, an overview comes first: each row's average per benchmark. A
cell reads `score @density (±difference from the dense cell of the same model and subset)`.
A cell run again under a new key (the model's weights changed, a class bumped its
`key_version`) shows its newest finished result (by `done.json`'s `finished`), marked `[^n]`;
note n lists the superseded directories. The difference is taken only against a dense result
of the same model weights: where the job files do not record which weights they ran with
(`env.json`: `weights`, else the `model_source` of a hub model) and the dense cell or this cell
has results under several keys, it is left blank rather than guessed.
Rows of the same method are told apart by the parameters whose values differ between them,
e.g. `oracle_topk (topk.heavy_size=0.05)`. Where a compression press ran, the benchmark's
table is followed by its compression leaderboard (kvpress's view): a row per model and press,
a column per compression ratio (dense at 0), each cell the score averaged over the subsets. Files written (into the output root, or `--out`),
chosen by `--format` (default md,csv): `report.md`, `results.csv` (one row per job, every
config value flattened), `report.json` (the tables as numbers), `report.html` (one
self-contained page, plots inline); and `plot_<benchmark>.png`: score against measured density
on a log axis, one panel per model and benchmark parameter group (e.g. RULER length), one curve
per method through its parameters, each point averaged over the subsets that every method of
the panel has (hollow and marked [n/N] where they share none), the Pareto front in gray.
Failed jobs are listed with their first error line, started jobs without a
completion marker as unfinished, and finished jobs whose result files cannot be read (not JSON,
not a JSON object) as unreadable, with the file named. A directory name that is not UTF-8 is
shown with replacement characters (U+FFFD).

Importing this module is light; matplotlib is imported only to draw.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sa_bench.launch import jobdir
from sa_bench.launch.identity import NON_RESULT_FIELDS, sanitize

JOB_FILES = jobdir.RESULT_FILES
"""A directory at job depth holding any of these is a job directory."""

BENCHMARK_NON_PARAMS = ("name", "subset", "subsets", "_target_")
"""Benchmark keys that name a column rather than parameterise it."""

DENSE = "dense"


# --- reading ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One job directory as found on disk."""

    path: Path
    relpath: str
    status: str  # done | running | failed | pending
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    error: str = ""
    progress: dict = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # "file: why" of each malformed file
    env: dict = field(default_factory=dict)
    finished: float | None = None  # done.json's `finished` (seconds since the epoch)

    def _section(self, name: str) -> dict:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    def _part(self, section: str, index: int) -> str:
        value = self._section(section).get("name")
        return str(value) if value is not None else self.relpath.split("/")[index]

    @property
    def model(self) -> str:
        return self._part("model", 0)

    @property
    def method(self) -> str:
        return self._part("sparse", 1)

    @property
    def benchmark(self) -> str:
        return self._part("benchmark", 2)

    @property
    def subset(self) -> str:
        value = self._section("benchmark").get("subset")
        return str(value) if value is not None else self.relpath.split("/")[3]

    @property
    def score(self) -> float | None:
        value = self.metrics.get("score")
        return float(value) if _is_number(value) else None

    @property
    def density(self) -> float | None:
        return measured_density(self.stats, self.method)

    @property
    def compression(self) -> float | None:
        return measured_compression(self.stats)

    @property
    def kv_read(self) -> float | None:
        """The fraction of the KV cache a step reads: decode density times the fraction a press
        kept (1 - achieved compression ratio); a masker alone: its density; a press alone: the
        fraction kept."""
        density = self.density
        if density is None:
            return None
        return density * (1.0 - (self.compression or 0.0))

    @property
    def compression_or_none(self) -> float | None:
        """The achieved compression ratio; 0 for the dense method, None for a method that
        compresses nothing (it has no point on the compression axis)."""
        return self.compression if self.compression is not None else (0.0 if self.method == DENSE else None)

    @property
    def prefill_density(self) -> float | None:
        return measured_prefill_density(self.stats)

    @property
    def weights(self) -> str | None:
        """The identity of the model weights the job ran with, as far as its files record it:
        env.json's `weights` where a job records it (as the job key has it); else, from
        env.json's `model_source`, `hub:<id>@<revision>` for a model loaded from the hub and
        just the kind of source for one loaded from files (`embedded`, `local`,
        `offline_fallback:<name>`: their fingerprint is not recorded, and the path differs
        between machines); None when nothing is recorded."""
        if isinstance(self.env.get("weights"), str):
            return self.env["weights"]
        source = self.env.get("model_source")
        kind = source.get("source") if isinstance(source, dict) else None
        if kind != "hub":
            return kind if isinstance(kind, str) else None
        model = self._section("model")
        return f"hub:{model.get('pretrained')}@{model.get('revision') or 'main'}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def measured_density(stats: dict, method: str) -> float | None:
    """Mean over layers of the non-null question-phase density (else decode; dense: 1.0)."""
    attention = stats.get("attention")
    table = attention.get("density") if isinstance(attention, dict) else None
    for phase in ("question", "decode"):
        layers = table.get(phase) if isinstance(table, dict) else None
        values = [v for v in layers if _is_number(v)] if isinstance(layers, list) else []
        if values:
            return sum(values) / len(values)
    return 1.0 if method == DENSE else None


def measured_compression(stats: dict) -> float | None:
    """The fraction of the KV cache a compression press removed (stats.json
    attention.compression.achieved_ratio); None for a method that compresses nothing."""
    attention = stats.get("attention")
    press = attention.get("compression") if isinstance(attention, dict) else None
    value = press.get("achieved_ratio") if isinstance(press, dict) else None
    return float(value) if _is_number(value) else None


def measured_prefill_density(stats: dict) -> float | None:
    """Mean over layers of the prefill density where the job ran a sparse prefill method
    (stats.json `attention.prefill_density_per_head` present; its `attention.density.prefill`
    per layer); None for a dense prefill."""
    attention = stats.get("attention")
    if not isinstance(attention, dict) or "prefill_density_per_head" not in attention:
        return None
    table = attention.get("density")
    layers = table.get("prefill") if isinstance(table, dict) else None
    values = [v for v in layers if _is_number(v)] if isinstance(layers, list) else []
    return sum(values) / len(values) if values else None


def find_job_dirs(root: Path) -> list[Path]:
    """`<root>/<model>/<sparse>/<benchmark>/<subset>/<key>/` directories holding any job file."""
    return sorted(
        p for p in root.glob("*/*/*/*/*")
        if p.is_dir() and any((p / name).exists() for name in JOB_FILES)
    )


def printable(text: str) -> str:
    """`text` (a path or name from the file system) with the bytes that are not UTF-8, which
    Python keeps as lone surrogates, replaced by U+FFFD: it can then be printed and written."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


JSON_TYPES = {list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
              float: "number"}


def read_object(path: Path, problems: list[str] | None = None) -> dict:
    """A JSON file that must hold an object; {} if it is missing. When it exists but cannot be
    read, is not JSON or holds something else, `file: why` is appended to `problems`."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    except (ValueError, RecursionError):  # ValueError: not JSON, or not UTF-8/16/32
        why = "not valid JSON"
    else:
        if isinstance(data, dict):
            return data
        why = f"a JSON {JSON_TYPES.get(type(data), 'value')} where an object is expected"
    if problems is not None:
        problems.append(f"{path.name}: {why}")
    return {}


def read_config(path: Path, problems: list[str] | None = None) -> dict:
    import yaml

    try:
        data = yaml.safe_load((path / jobdir.CONFIG).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        why = "not readable YAML"
    else:
        if isinstance(data, dict):
            return data
        why = "not a mapping"
    if problems is not None:
        problems.append(f"{jobdir.CONFIG}: {why}")
    return {}


def first_error_line(path: Path) -> str:
    """`jobdir.first_error_line`, also for an error.txt that is not UTF-8."""
    try:
        return jobdir.first_error_line(path)
    except ValueError:
        text = (path / jobdir.ERROR).read_bytes().decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def read_job(root: Path, path: Path) -> Job:
    status = jobdir.status(path, path.name)
    problems: list[str] = []
    job = Job(path=path, relpath=printable(path.relative_to(root).as_posix()), status=status,
              config=read_config(path, problems))
    if status == "done":
        job.metrics = read_object(path / jobdir.METRICS, problems)
        job.stats = read_object(path / jobdir.STATS, problems)
        job.env = read_object(path / jobdir.ENV, problems)
        finished = read_object(path / jobdir.MARKER).get("finished")
        job.finished = float(finished) if _is_number(finished) else None
    elif status == "failed":
        try:
            job.error = first_error_line(path)
        except OSError:
            job.error = ""
    else:
        job.progress = read_object(path / jobdir.PROGRESS)
    job.unreadable = problems
    return job


def read_jobs(root: Path) -> list[Job]:
    return [read_job(root, path) for path in find_job_dirs(root)]


def _matches(values: Iterable[str], globs: list[str] | None) -> bool:
    if not globs:
        return True
    return any(fnmatch.fnmatchcase(v, g) for v in values for g in globs)


def select(jobs: list[Job], model: list[str] | None = None, method: list[str] | None = None,
           benchmark: list[str] | None = None) -> list[Job]:
    """Jobs whose model / sparse method / benchmark (or benchmark/subset) match any glob given."""
    return [
        j for j in jobs
        if _matches([j.model], model) and _matches([j.method], method)
        and _matches([j.benchmark, f"{j.benchmark}/{j.subset}"], benchmark)
    ]


# --- flattening --------------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists become JSON text (hashable, one CSV cell)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: "{}"}
    if isinstance(data, (list, tuple)):
        return {prefix[:-1]: json.dumps(data)}
    return {prefix[:-1]: data}


def _fmt_value(value: Any) -> str:
    return "-" if value is None else str(value)


def _differing(items: list[dict[str, Any]]) -> set[str]:
    """Keys whose values are not the same in every dict (a missing key counts as a value)."""
    keys = set().union(*items) if items else set()
    return {k for k in keys if len({json.dumps(d.get(k, "<missing>"), default=str) for d in items}) > 1}


def _short(key: str) -> str:
    """`sparse.maskers.topk.heavy_size` -> `topk.heavy_size`; `sparse.phase` -> `phase`."""
    for prefix in ("sparse.maskers.", "sparse."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    benchmark: str
    subset: str
    params: tuple[tuple[str, Any], ...]  # benchmark parameters (sample counts, ...)


@dataclass
class Row:
    model: str
    method: str
    identity: dict[str, Any]  # every result-affecting value except the benchmark's
    label: str = ""
    shown: list[str] = field(default_factory=list)  # identity keys spelled out in the label
    cells: dict[Column, Job] = field(default_factory=dict)  # the job shown in each cell
    older: dict[Column, list[Job]] = field(default_factory=dict)  # the cell's other jobs, best first

    def finished(self, column: Column) -> list[Job]:
        """The cell's finished jobs, newest first (the first is the one shown)."""
        return [j for j in [self.cells.get(column), *self.older.get(column, [])]
                if j is not None and j.status == "done"]

    @property
    def context(self) -> tuple:
        """What must match for a dense row to be this row's reference: all but `sparse.*`."""
        return tuple(sorted((k, json.dumps(v, default=str)) for k, v in self.identity.items()
                            if not k.startswith("sparse.")))


@dataclass
class Table:
    rows: list[Row]
    columns: list[Column]
    column_labels: dict[Column, str]
    dense: dict[int, Row | None]  # id(row) -> its dense reference row

    @property
    def superseded(self) -> list[tuple[Row, Column]]:
        """The cells with older finished results than the one shown, in table order (the
        footnote of the i-th is [^i])."""
        return [(r, c) for b in self.benchmarks for r in self.rows for c in self.columns
                if c.benchmark == b and len(r.finished(c)) > 1]

    @property
    def benchmarks(self) -> list[str]:
        return sorted({c.benchmark for c in self.columns})

    def columns_of(self, benchmark: str | None) -> list[Column]:
        return [c for c in self.columns if benchmark is None or c.benchmark == benchmark]

    def rows_of(self, benchmark: str | None) -> list[Row]:
        """The rows with a cell (of any status) in `benchmark`'s columns."""
        columns = self.columns_of(benchmark)
        return [r for r in self.rows if any(c in r.cells for c in columns)]

    def reference(self, row: Row, column: Column, job: Job | None = None) -> Job | None:
        """The dense job that `job` (a finished job of the cell; default: the one shown) is
        compared with: the newest finished one of the reference row's cell with the same
        recorded weights; where a side records none, the only one, and only while neither cell
        has results under several keys (else which weights are whose cannot be told)."""
        job = job if job is not None else row.cells.get(column)
        ref = self.dense.get(id(row))
        if job is None or job.status != "done" or ref is None:
            return None
        candidates = ref.finished(column)
        if any(d is job for d in candidates):
            return job
        for dense in candidates:
            if job.weights is not None and dense.weights == job.weights:
                return dense
        if len(candidates) == 1 and len(row.finished(column)) == 1 and (
                job.weights is None or candidates[0].weights is None):
            return candidates[0]
        return None

    def dense_score(self, row: Row, column: Column, job: Job | None = None) -> float | None:
        ref = self.reference(row, column, job)
        return ref.score if ref is not None else None

    def cell(self, row: Row, column: Column, job: Job | None = None, density: str = "decode"
             ) -> tuple[float | None, float | None, float | None]:
        """(score, density, score - dense score) of a finished job of the cell (default: the
        one shown); Nones where unknown. `density`: `decode` (the question and answer tokens)
        or `prefill` (a job without a sparse prefill method computed every pair: 1.0)."""
        job = job if job is not None else row.cells.get(column)
        if job is None or job.status != "done":
            return None, None, None
        score, ref = job.score, self.dense_score(row, column, job)
        diff = score - ref if score is not None and ref is not None else None
        return score, job_density(job, density), diff

    def mean_of(self, row: Row, columns: list[Column], attr: str) -> float | None:
        """The mean of a finished job's `attr` (a `Job` property) over the row's cells among
        `columns` that have a score."""
        jobs = [row.cells.get(c) for c in columns]
        return _mean(getattr(j, attr) for j in jobs
                     if j is not None and j.status == "done" and j.score is not None)

    def average(self, row: Row, columns: list[Column] | None = None, density: str = "decode"
                ) -> tuple[float | None, float | None, float | None, int]:
        """Means over the row's finished cells among `columns`; the last value counts them."""
        values = [self.cell(row, c, density=density)
                  for c in (columns if columns is not None else self.columns)]
        values = [v for v in values if v[0] is not None]
        return (_mean(v[0] for v in values), _mean(v[1] for v in values),
                _mean(v[2] for v in values), len(values))

    def prefill_average(self, row: Row, columns: list[Column]) -> float | None:
        """Mean prefill density over the row's scored cells among `columns` that ran a sparse
        prefill method (None where none did)."""
        return _mean(row.cells[c].prefill_density for c in columns
                     if c in row.cells and self.cell(row, c)[0] is not None)


DENSITIES = ("decode", "prefill")
"""What the score-vs-density plot puts on its x axis (`--density`)."""


def job_density(job: Job, density: str) -> float | None:
    if density == "prefill":
        return job.prefill_density if job.prefill_density is not None else 1.0
    return job.density


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


RUN_ONLY_KEYS = ("output_root", "plan", "hydra")
"""Top-level config keys that are not JobSpec fields and never change a result."""


def result_values(config: dict) -> dict:
    """The part of a job's resolved config that can change its result (as in the job key)."""
    skip = NON_RESULT_FIELDS["JobSpec"] | set(RUN_ONLY_KEYS)
    values = {k: v for k, v in config.items() if k not in skip}
    if isinstance(values.get("benchmark"), dict):
        values["benchmark"] = {k: v for k, v in values["benchmark"].items()
                               if k not in NON_RESULT_FIELDS["benchmark"]}
    return values


def _row_identity(config: dict) -> dict[str, Any]:
    values = result_values(config)
    return {k: v for k, v in flatten(values).items() if not k.startswith("benchmark.")}


def _column_of(job: Job) -> Column:
    bench = result_values(job.config).get("benchmark")
    bench = bench if isinstance(bench, dict) else {}
    params = flatten({k: v for k, v in bench.items() if k not in BENCHMARK_NON_PARAMS})
    return Column(job.benchmark, job.subset, tuple(sorted(params.items(), key=lambda kv: kv[0])))


def build_table(jobs: list[Job]) -> Table:
    """Rows and columns from every job with a readable config (finished or not)."""
    rows: dict[tuple, Row] = {}
    columns: set[Column] = set()
    for job in jobs:
        if not job.config:
            continue
        identity = _row_identity(job.config)
        key = tuple(sorted((k, json.dumps(v, default=str)) for k, v in identity.items()))
        row = rows.setdefault(key, Row(job.model, job.method, identity))
        column = _column_of(job)
        columns.add(column)
        row.older.setdefault(column, []).append(job)
    for row in rows.values():
        for column, cell in row.older.items():
            cell.sort(key=lambda j: (_rank(j), j.relpath), reverse=True)
            row.cells[column] = cell.pop(0)
    ordered = list(rows.values())
    _label_rows(ordered)
    ordered.sort(key=lambda r: (r.model, r.method != DENSE, r.method,
                                [_value_order(r.identity.get(k)) for k in r.shown]))
    column_list = sorted(columns, key=lambda c: (c.benchmark, c.subset, str(c.params)))
    dense = {id(r): _dense_reference(r, ordered) for r in ordered}
    return Table(ordered, column_list, _column_labels(column_list), dense)


def _rank(job: Job) -> tuple:
    """Which of two jobs for the same cell to show: done first, then the newest marker."""
    order = {"done": 3, "running": 2, "failed": 1, "pending": 0}[job.status]
    return order, job.finished or 0.0


def _label_rows(rows: list[Row]) -> None:
    """`method (param=value, ...)` with the parameters that differ between rows of the method;
    model parameters (other than the name) that differ between rows of one model are added."""
    by_method: dict[str, list[Row]] = {}
    by_model: dict[str, list[Row]] = {}
    for row in rows:
        by_method.setdefault(row.method, []).append(row)
        by_model.setdefault(row.model, []).append(row)
    method_keys = {
        m: _differing([{k: v for k, v in r.identity.items() if not k.startswith("model.")}
                       for r in group])
        for m, group in by_method.items()
    }
    model_keys = {
        m: _differing([{k: v for k, v in r.identity.items() if k.startswith("model.")}
                       for r in group])
        for m, group in by_model.items()
    }
    for row in rows:
        keys = sorted(method_keys[row.method] - {"sparse.name"},
                      key=lambda k: (not k.startswith("sparse."), k))
        keys += sorted(model_keys[row.model] - {"model.name"})
        row.shown = keys
        row.label = _label(row, keys)


def _label(row: Row, keys: list[str]) -> str:
    """`method (param=value, ...)` with the values of `keys` in the row's identity."""
    params = ", ".join(f"{_short(k)}={_fmt_value(row.identity.get(k))}" for k in keys)
    return f"{row.method} ({params})" if params else row.method


def _value_order(value: Any) -> tuple:
    """Numbers in numeric order, then text, then missing values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value)) if value is not None else (2, 0, "")


def _column_labels(columns: list[Column]) -> dict[Column, str]:
    by_bench: dict[str, list[Column]] = {}
    for column in columns:
        by_bench.setdefault(column.benchmark, []).append(column)
    labels = {}
    for bench, group in by_bench.items():
        keys = sorted(_differing([dict(c.params) for c in group]))
        for column in group:
            params = dict(column.params)
            extra = ", ".join(f"{k}={_fmt_value(params.get(k))}" for k in keys)
            labels[column] = f"{bench}/{column.subset}" + (f" ({extra})" if extra else "")
    return labels


WEIGHTS_KEYS = ("model.pretrained", "model.revision")
"""The config values that say which weights a model loads."""


def _dense_reference(row: Row, rows: list[Row]) -> Row | None:
    """The dense row with the same model and other values; else the only dense row of the model
    that loads the same weights (`WEIGHTS_KEYS`)."""
    dense = [r for r in rows if r.method == DENSE and r.model == row.model]
    exact = [r for r in dense if r.context == row.context]
    if exact:
        return exact[0]
    same = [r for r in dense if all(r.identity.get(k) == row.identity.get(k) for k in WEIGHTS_KEYS)]
    return same[0] if len(same) == 1 else None


# --- text --------------------------------------------------------------------------------------

PLACEHOLDER = {"running": "running", "failed": "FAILED", "pending": "unfinished"}
METRICS_UNREADABLE = f"{jobdir.METRICS}: "


def format_cell(score: float | None, density: float | None, diff: float | None) -> str:
    if score is None:
        return ""
    text = f"{score:.1f}"
    if density is not None:
        text += f" @{density:.3f}"
    if diff is not None:
        text += f" ({diff:+.1f})"
    return text


def table_cells(table: Table, benchmark: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and body of one benchmark's results table (default: every column) as strings
    (shared by the console, markdown, HTML and JSON); the average is over those columns."""
    columns = table.columns_of(benchmark)
    header = ["model", "sparse"] + [table.column_labels[c] for c in columns] + ["average"]
    marks = {(id(r), c): f" [^{i}]" for i, (r, c) in enumerate(table.superseded, 1)}
    body = []
    for row in table.rows_of(benchmark):
        line = [row.model, row.label]
        for column in columns:
            job = row.cells.get(column)
            if job is None:
                line.append("")
            elif job.status != "done":
                line.append(PLACEHOLDER[job.status])
            elif any(p.startswith(METRICS_UNREADABLE) for p in job.unreadable):
                line.append("unreadable")
            elif job.score is None:
                line.append("no score")
            else:
                line.append(format_cell(*table.cell(row, column)))
                if job.prefill_density is not None:
                    line[-1] += f" prefill @{job.prefill_density:.3f}"
            line[-1] += marks.get((id(row), column), "")
        line.append(average_text(table, row, columns))
        body.append(line)
    return header, body


def average_text(table: Table, row: Row, columns: list[Column]) -> str:
    score, density, diff, n = table.average(row, columns)
    text = format_cell(score, density, diff)
    prefill = table.prefill_average(row, columns)
    if text and prefill is not None:
        text += f" prefill @{prefill:.3f}"
    return text + f" [{n}/{len(columns)}]" if text and n < len(columns) else text


def overview_cells(table: Table) -> tuple[list[str], list[list[str]]]:
    """The sweep at a glance: each row's average per benchmark (over that benchmark's
    subsets only), with its difference from the dense row of the same model."""
    header = ["model", "sparse", *table.benchmarks]
    body = [[row.model, row.label,
             *(average_text(table, row, table.columns_of(b))
               if any(c in row.cells for c in table.columns_of(b)) else ""
               for b in table.benchmarks)]
            for row in table.rows]
    return header, body


LEGEND = ("cell = score @ measured density of the question and answer tokens (score - dense score, "
          "same model, weights and subset; blank where that dense result cannot be told), and "
          "prefill @ measured prefill density where the job ran a sparse prefill method; [^i]: older results of the cell "
          "exist (note i); average over the row's finished cells, [n/N] when some are missing")


def _when(job: Job) -> str:
    if job.finished is None:
        return "finished at an unrecorded time"
    return "finished " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.finished))


def _about(job: Job) -> str:
    score = "no score" if job.score is None else f"score {job.score:g}"
    return f"{job.relpath} ({_when(job)}, {score})"


def superseded_notes(table: Table) -> list[str]:
    """`[^i]: ...` for each cell with older results: the one shown and the superseded ones."""
    notes = []
    for i, (row, column) in enumerate(table.superseded, 1):
        shown, *older = row.finished(column)
        text = (f"[^{i}]: {row.model} / {row.label} / {table.column_labels[column]}: shows "
                f"{_about(shown)}; superseded: " + ", ".join(_about(j) for j in older))
        ref = table.dense.get(id(row))
        if shown.score is not None and ref is not None and ref.finished(column) \
                and table.reference(row, column) is None:
            text += ("; no difference from dense: the job files do not tell which dense result "
                     "had the same model weights")
        notes.append(text)
    return notes


def format_text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_markdown_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    rule = "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def status_entries(jobs: list[Job]) -> list[tuple[str, str, str]]:
    """(kind, job path, detail): failed jobs with their first error line, then running jobs,
    then jobs started but not finished (no valid completion marker), then finished jobs the
    table cannot place because their config.yaml is missing or unreadable, then finished jobs
    with a result file that cannot be read (each such file named with why)."""
    entries = [("failed", j.relpath, j.error or "(empty error.txt)")
               for j in jobs if j.status == "failed"]
    for job in jobs:
        if job.status in ("running", "pending"):
            done, total = job.progress.get("done"), job.progress.get("total")
            detail = f"{done}/{total} samples" if _is_number(done) and _is_number(total) \
                and total else ""
            damaged = jobdir.damaged_results(job.path, job.path.name)
            if damaged:
                detail = ("finished, but since then result files went missing or changed: "
                          + ", ".join(damaged) + " (the next sweep reruns it)")
            entries.append(("running" if job.status == "running" else "unfinished",
                            job.relpath, detail))
    for job in jobs:
        if job.status == "done" and not job.config:
            score = "no score" if job.score is None else f"score {job.score:g}"
            why = "; ".join(job.unreadable)
            entries.append(("no config", job.relpath,
                            f"finished ({score}) but {jobdir.CONFIG} is missing or unreadable"
                            + (f" ({why})" if why else "") + ", so it is not in the table"))
        elif job.status == "done" and job.unreadable:
            entries.append(("unreadable", job.relpath, "; ".join(job.unreadable)))
    return entries


def status_lines(jobs: list[Job]) -> list[str]:
    return [f"{kind:<10}  {rel}" + (f": {detail}" if detail else "")
            for kind, rel, detail in status_entries(jobs)]


def counts(jobs: list[Job]) -> str:
    n = {s: sum(j.status == s for j in jobs) for s in ("done", "failed", "running", "pending")}
    return (f"{len(jobs)} jobs: {n['done']} done, {n['failed']} failed, {n['running']} running, "
            f"{n['pending']} unfinished")


# --- files -------------------------------------------------------------------------------------

LEADING_CSV = ["path", "status", "superseded", "superseded_by", "error", "finished", "density",
               "prefill_density", "compression", "dense_score", "score_vs_dense", "dense_path",
               "model_weights"]


def write_csv(jobs: list[Job], table: Table, path: Path) -> None:
    """One row per job: status, derived numbers, every config value, metrics.*, stats.*.
    `superseded`: a newer finished job of the same cell is shown in the table instead."""
    where = {id(job): (row, column) for row in table.rows
             for column in row.cells for job in [row.cells[column], *row.older.get(column, [])]}
    records = []
    for job in jobs:
        record: dict[str, Any] = {"path": job.relpath, "status": job.status,
                                  "error": job.error or "; ".join(job.unreadable)}
        if job.status == "done":
            record.update(density=job.density, prefill_density=job.prefill_density,
                          compression=job.compression, finished=job.finished,
                          model_weights=job.weights, superseded=False)
            if id(job) in where:
                row, column = where[id(job)]
                shown = row.cells[column]
                if shown is not job:
                    record.update(superseded=True, superseded_by=shown.relpath)
                ref = table.reference(row, column, job)
                record["dense_path"] = ref.relpath if ref is not None else None
                record["dense_score"] = ref.score if ref is not None else None
                record["score_vs_dense"] = table.cell(row, column, job)[2]
        record.update(flatten(job.config))
        for prefix, data in (("metrics.", job.metrics), ("stats.", job.stats)):
            if data:
                record.update(flatten(data, prefix))
        records.append(record)
    keys: set[str] = set().union(*records) if records else set()
    rest = sorted(keys - set(LEADING_CSV),
                  key=lambda k: (k.startswith("metrics."), k.startswith("stats."), k))
    # written whole and then renamed: a reader never sees a half-written table
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="replace") as f:
        writer = csv.DictWriter(f, fieldnames=LEADING_CSV + rest, restval="")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    os.replace(tmp, path)


@dataclass
class Point:
    label: str  # the row's label
    density: float
    score: float
    n: int  # cells averaged
    shared: bool  # averaged over the cells every method of the panel has


@dataclass
class Panel:
    model: str
    group: str  # the benchmark parameters that set this panel apart ("" when one panel)
    columns: list[Column]
    shared: list[Column]  # the columns every plotted row has a finished score in
    curves: dict[str, list[Point]]  # method -> points sorted by density

    @property
    def title(self) -> str:
        text = self.model + (f", {self.group}" if self.group else "")
        if self.shared:
            return text + f"\nmean over {len(self.shared)} of {len(self.columns)} subsets, shared by all"
        return text + "\nno subset shared by all: hollow points average their own [n/N]"


def _groups(columns: list[Column]) -> dict[str, list[Column]]:
    """A benchmark's columns by the parameters that differ between them (e.g. length)."""
    keys = sorted(_differing([dict(c.params) for c in columns]))
    out: dict[str, list[Column]] = {}
    for column in columns:
        params = dict(column.params)
        out.setdefault(", ".join(f"{k}={_fmt_value(params.get(k))}" for k in keys), []).append(column)
    return out


@dataclass(frozen=True)
class Axis:
    """An x-axis of the plots: the `Job` property plotted, its label, log scale, file suffix."""

    attr: str
    label: str
    log: bool
    suffix: str


AXES = {
    "density": Axis("density", "measured attention density (log)", True, ""),
    "compression": Axis("compression_or_none", "achieved KV compression ratio (kvpress's leaderboard view)",
                        False, "_compression"),
    "kv_read": Axis("kv_read", "fraction of the KV cache read: density x (1 - compression) (log)",
                    True, "_kv_read"),
}
"""Score against: measured density; the compression ratio (presses and dense only); the
fraction of the KV cache read, where decode-time and compression methods share one axis."""


def plot_panels(table: Table, benchmark: str, axis: str = "density",
                density: str = "decode") -> list[Panel]:
    """One panel per model and benchmark parameter group (a RULER length, ...): one curve per
    method through its parameter sweep. A point averages the row's scores over the subsets
    every row of the panel has; where they share none, over its own (marked). `axis`: a key of
    `AXES` (a point's `density` holds that axis's value); on the density axis, `density` says
    which measured density (`job_density`: decode, or prefill)."""
    x_axis = AXES[axis]
    panels = []
    for group, columns in sorted(_groups(table.columns_of(benchmark)).items()):
        for model in sorted({r.model for r in table.rows}):
            scored = {id(r): [c for c in columns if table.cell(r, c)[0] is not None]
                      for r in table.rows if r.model == model}
            rows = [r for r in table.rows if r.model == model and scored[id(r)]]
            if not rows:
                continue
            shared = [c for c in columns if all(c in scored[id(r)] for r in rows)]
            curves: dict[str, list[Point]] = {}
            for row in rows:
                score, x, _, n = table.average(row, shared or scored[id(row)], density)
                if axis != "density":
                    x = table.mean_of(row, shared or scored[id(row)], x_axis.attr)
                if score is not None and x is not None and (x > 0 or not x_axis.log):
                    curves.setdefault(row.method, []).append(
                        Point(row.label, x, score, n, bool(shared)))
            for points in curves.values():
                points.sort(key=lambda p: (p.density, p.score))
            if curves:
                panels.append(Panel(model, group, columns, shared, curves))
    return panels


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats (as dense or sparser and at least as good), by density."""
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (p.density, -p.score)):
        if not front or point.score > front[-1].score:
            front.append(point)
    return front


LEGEND_INSIDE_MAX = 8
"""A panel with more curves than this has its legend beside it."""


def plot_figure(table: Table, benchmark: str, axis: str = "density", density: str = "decode") -> Any:
    """Score against measured density (log axis; or another of `AXES`) for one benchmark: a
    panel per model and benchmark parameter group, a curve per method, the Pareto front in gray
    (not on the compression axis, where higher is smaller); None if nothing can be drawn (on
    the compression axis: no press was run)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    x_axis = AXES[axis]
    panels = plot_panels(table, benchmark, axis, density)
    if axis == "compression":
        panels = [p for p in panels if set(p.curves) - {DENSE}]
    if not panels:
        return None
    families = sorted({r.method for r in table.rows} - {DENSE})
    # one colour and line style per method everywhere: the 10 colours, then dashed, dotted
    styles = {m: (f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]) for i, m in enumerate(families)}
    fig = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for method, points in sorted(panel.curves.items()):
            xs, ys = [p.density for p in points], [p.score for p in points]
            if method == DENSE:
                ax.axhline(ys[0], color="gray", linestyle="--", linewidth=1)
                if not x_axis.log:  # the compression axis: dense sits at 0
                    ax.plot(xs, ys, "k*", markersize=10, label=method)
                    continue
                ax.plot(xs, ys, "k*", markersize=10, label=method)
                continue
            color, linestyle = styles[method]
            ax.plot(xs, ys, color=color, linestyle=linestyle, label=method)
            for p in points:
                ax.plot(p.density, p.score, "o", color=color,
                        markerfacecolor=color if p.shared else "none")
                if not p.shared:
                    ax.annotate(f"[{p.n}/{len(panel.columns)}]", (p.density, p.score),
                                fontsize="x-small", xytext=(3, 3), textcoords="offset points")
        if x_axis.log:
            front = pareto_front([p for ps in panel.curves.values() for p in ps])
            ax.step([p.density for p in front], [p.score for p in front], where="post",
                    color="gray", alpha=0.4, linewidth=3, label="Pareto front")
            ax.set_xscale("log")
            # decimal labels at 1, 2 and 5 of each decade, none on the minor ticks (they overlapped)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(-0.02, 1.0)
        ax.set_title(panel.title, fontsize="small")
        ax.set_xlabel("measured prefill density (log)" if axis == "density" and density == "prefill"
                      else x_axis.label)
        ax.grid(True, which="both", alpha=0.3)
        # many curves: the legend beside the panel rather than over the points
        ax.legend(fontsize="small", **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}
                                       if len(panel.curves) > LEGEND_INSIDE_MAX else {}))
    axes[0].set_ylabel(f"{benchmark} score")
    return fig


def write_plots(table: Table, out_dir: Path, density: str = "decode") -> list[Path]:
    """`plot_<benchmark>.png` (score against density) for each benchmark with something to
    draw (`plot_figure`); where a press ran, beside it `plot_<benchmark>_compression.png`
    (score against compression ratio) and `plot_<benchmark>_kv_read.png` (every method
    against the fraction of the KV cache read). `density`: the density axis's measure (decode,
    or prefill)."""
    written = []
    for benchmark in table.benchmarks:
        compressed = any(job.compression is not None for row in table.rows
                         for column in table.columns_of(benchmark)
                         if (job := row.cells.get(column)) is not None)
        for axis in ("density", "compression", "kv_read") if compressed else ("density",):
            fig = plot_figure(table, benchmark, axis, density)
            if fig is not None:
                path = out_dir / f"plot_{sanitize(benchmark)}{AXES[axis].suffix}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")  # the outside legend and labels whole
                written.append(path)
    return written


RATIO_KEY = "sparse.compression.compression_ratio"
"""The press's compression ratio as configured (and swept) in a `sparse` config."""


def leaderboard_ratio(table: Table, row: Row, columns: list[Column]) -> float | None:
    """A row's column on the compression leaderboard: 0 for dense; the configured
    compression ratio (the value swept); else, for a press that derives its ratio (e.g.
    `composed`), the mean achieved ratio to 3 places; None for a method that compresses nothing."""
    if row.method == DENSE:
        return 0.0
    value = row.identity.get(RATIO_KEY)
    if _is_number(value):
        return float(value)
    achieved = table.mean_of(row, columns, "compression")
    return round(achieved, 3) if achieved is not None else None


def leaderboard_sections(table: Table, benchmark: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """kvpress's leaderboard view of one benchmark, one table per benchmark parameter group
    (e.g. RULER length): a row per model and press (parameters other than the ratio spelled
    out), a column per compression ratio (dense at 0), each cell the score averaged over the
    group's subsets (score - dense score), [n/N] when subsets are missing. Empty where no press
    ran."""
    out = []
    for group, columns in sorted(_groups(table.columns_of(benchmark)).items()):
        cells: dict[tuple[str, str], dict[float, str]] = {}
        for row in table.rows_of(benchmark):
            ratio = leaderboard_ratio(table, row, columns)
            score, _, diff, n = table.average(row, columns)
            if ratio is None or score is None:
                continue
            text = format_cell(score, None, diff)
            label = _label(row, [k for k in row.shown if k != RATIO_KEY])
            cells.setdefault((row.model, label), {}).setdefault(
                ratio, text + (f" [{n}/{len(columns)}]" if n < len(columns) else ""))
        if not any(r for values in cells.values() for r in values if r > 0):
            continue
        ratios = sorted({r for values in cells.values() for r in values})
        header = ["model", "press", *(f"{r:g}" for r in ratios)]
        order = sorted(cells, key=lambda ml: (ml[0], not ml[1].startswith(DENSE), ml[1]))
        body = [[model, label, *(cells[(model, label)].get(r, "") for r in ratios)]
                for model, label in order]
        title = f"{benchmark}: compression leaderboard (score by compression ratio)"
        out.append((title + (f", {group}" if group else ""), header, body))
    return out


def sections(table: Table) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of each table: the overview (when the tree holds several
    benchmarks), then one table per benchmark with its own subsets and average, each followed
    by its compression leaderboard where a press ran (`leaderboard_sections`)."""
    out = [part for b in table.benchmarks
           for part in [(b, *table_cells(table, b)), *leaderboard_sections(table, b)]]
    if len(table.benchmarks) > 1:
        out.insert(0, ("overview: average per benchmark", *overview_cells(table)))
    return out


def write_markdown(jobs: list[Job], table: Table, root: Path, plots: list[Path],
                   path: Path) -> None:
    parts = [f"# sa_bench report: `{printable(str(root))}`", "", counts(jobs), "", "## Results",
             "", f"_{LEGEND}._"]
    for title, header, body in sections(table):
        parts += ["", f"### {title}", "", format_markdown_table(header, body)]
    if not table.rows:
        parts += ["", "(no jobs)"]
    notes = superseded_notes(table)
    if notes:
        parts += ["", "Cells with older results (superseded, not shown):", "", *notes]
    parts += ["", "## Failed and unfinished jobs", ""]
    parts += [f"- **{kind}** `{rel}`" + (f": {detail}" if detail else "")
              for kind, rel, detail in status_entries(jobs)] or ["none"]
    if plots:
        parts += ["", "## Plots", "", f"_{PLOT_LEGEND}._", ""]
        parts += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8", errors="replace")


PLOT_LEGEND = ("score against measured attention density (log axis), one curve per method "
               "through its parameters, averaged over the subsets every method of the panel has "
               "(hollow points: over their own, [n/N]); gray: the Pareto front")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in line) + "</tr>"
                   for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


HTML_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
              "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}img{max-width:100%}")


def write_html(jobs: list[Job], table: Table, root: Path, plots: list[Path], path: Path) -> None:
    """One self-contained page (plots inline as base64 PNG): it can be mailed or published."""
    import base64
    from html import escape

    title = f"sa_bench report: {printable(str(root))}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p>{escape(counts(jobs))}</p>", f"<p><em>{escape(LEGEND)}</em></p>"]
    for name, header, body in sections(table):
        parts += [f"<h2>{escape(name)}</h2>", _html_table(header, body)]
    notes = superseded_notes(table)
    if notes:
        parts += ["<h2>Cells with older results (superseded, not shown)</h2><ul>",
                  *(f"<li>{escape(n)}</li>" for n in notes), "</ul>"]
    entries = status_entries(jobs)
    parts += ["<h2>Failed and unfinished jobs</h2><ul>",
              *(f"<li><b>{escape(k)}</b> <code>{escape(r)}</code>" + (f": {escape(d)}" if d else "")
                + "</li>" for k, r, d in entries), "</ul>" if entries else "</ul><p>none</p>"]
    if plots:
        parts += ["<h2>Plots</h2>", f"<p><em>{escape(PLOT_LEGEND)}</em></p>"]
        parts += [f"<p><img alt='{escape(p.stem)}' src='data:image/png;base64,"
                  f"{base64.b64encode(p.read_bytes()).decode('ascii')}'></p>" for p in plots]
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8", errors="replace")


def write_json(jobs: list[Job], table: Table, root: Path, path: Path) -> None:
    """The tables as numbers: per benchmark, each row's cells and average, and its column on the
    compression leaderboard (`compression_ratio`: 0 for dense, null for a method that compresses
    nothing); status; notes."""
    def numbers(row: Row, columns: list[Column]) -> dict[str, Any]:
        score, density, diff, n = table.average(row, columns)
        return {"score": score, "density": density, "score_vs_dense": diff, "cells": n,
                "prefill_density": table.prefill_average(row, columns),
                "of": len(columns)}

    benchmarks = {}
    for benchmark in table.benchmarks:
        columns = table.columns_of(benchmark)
        rows = []
        for row in table.rows_of(benchmark):
            cells = {}
            for column in columns:
                job = row.cells.get(column)
                if job is not None:
                    score, density, diff = table.cell(row, column)
                    cells[table.column_labels[column]] = {
                        "status": job.status, "path": job.relpath, "score": score,
                        "density": density, "prefill_density": job.prefill_density,
                        "compression": job.compression, "score_vs_dense": diff}
            rows.append({"model": row.model, "sparse": row.label, "method": row.method,
                         "compression_ratio": leaderboard_ratio(table, row, columns),
                         "cells": cells, "average": numbers(row, columns)})
        benchmarks[benchmark] = {"columns": [table.column_labels[c] for c in columns], "rows": rows}
    data = {"output_root": printable(str(root)), "counts": counts(jobs), "benchmarks": benchmarks,
            "superseded": superseded_notes(table),
            "status": [{"kind": k, "path": r, "detail": d} for k, r, d in status_entries(jobs)]}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8", errors="replace")


FORMATS = {"md": "report.md", "csv": "results.csv", "json": "report.json", "html": "report.html"}


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sa_bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_root", nargs="?", default="outputs",
                        type=lambda text: Path(text.removeprefix("output_root=")),
                        help="the sweep's output_root (default: outputs); `output_root=DIR` as "
                             "on the sweep's command line works too")
    parser.add_argument("--model", action="append", metavar="GLOB", help="model name glob (repeatable)")
    parser.add_argument("--method", action="append", metavar="GLOB",
                        help="sparse method name glob (repeatable)")
    parser.add_argument("--benchmark", action="append", metavar="GLOB",
                        help="benchmark or benchmark/subset glob (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, results.csv and the plots go (default: output_root)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--density", choices=DENSITIES, default="decode",
                        help="the plots' x axis: the question/decode density (default) or the "
                             "prefill density (1.0 where the prefill was dense)")
    parser.add_argument("--format", action="append", metavar="md|csv|json|html",
                        type=lambda text: [f.strip() for f in text.split(",") if f.strip()],
                        help="which files to write, repeatable or comma-separated (default: "
                             "md,csv): report.md, results.csv, report.json, report.html "
                             "(self-contained: plots inline)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    formats = {f for group in args.format or [["md", "csv"]] for f in group}
    if formats - set(FORMATS):
        print(f"sa_bench.report: --format: unknown {', '.join(sorted(formats - set(FORMATS)))} "
              f"(choose from {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    root: Path = args.output_root
    if not root.is_dir():
        print(f"sa_bench.report: {root} is not a directory", file=sys.stderr)
        return 2
    jobs = select(read_jobs(root), args.model, args.method, args.benchmark)
    table = build_table(jobs)
    out: Path = args.out or root
    out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else write_plots(table, out, args.density)
    written = [out / FORMATS[f] for f in FORMATS if f in formats]
    for path in written:
        if path.name == "results.csv":
            write_csv(jobs, table, path)
        elif path.name == "report.json":
            write_json(jobs, table, root, path)
        else:
            (write_markdown if path.suffix == ".md" else write_html)(jobs, table, root, plots, path)
    # printed last: the files are complete even when the reader stops early (`| head`)
    if hasattr(sys.stdout, "reconfigure"):  # a console that cannot show U+FFFD gets "?"
        sys.stdout.reconfigure(errors="replace")
    try:
        print(counts(jobs))
        if table.rows:
            print(LEGEND)
        for title, header, body in sections(table):
            print(f"\n{title}:\n{format_text_table(header, body)}")
        notes = superseded_notes(table)
        if notes:
            print("\ncells with older results (superseded, not shown):")
            print("\n".join("  " + note for note in notes))
        status = status_lines(jobs)
        if status:
            print("\nfailed and unfinished jobs:")
            print("\n".join("  " + line for line in status))
        print(printable("\nwrote " + ", ".join(str(p) for p in [*written, *plots])))
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader is gone: say nothing more (and let no flush at exit fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
