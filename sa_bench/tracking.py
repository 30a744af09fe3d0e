"""Experiment tracking: each finished cell as one MLflow or W&B run (`+tracker=mlflow|wandb`).

    python -m sa_bench -m ... +tracker=mlflow     # or +tracker=wandb
    python -m sa_bench.tracking OUTPUT_ROOT [--tracker mlflow|wandb]   # log cells run without it

A run holds the cell's config flattened as params (model, method and its parameters,
benchmark, subset, key), its numbers as metrics (`score` and the other numbers of
`metrics.json`; `density` as the report measures it and `density.<phase>` for each phase
recorded; every number of `stats.json` as `stats.*`: timings, peak memory, compression when
the method records it; lists of per-layer values as their mean) and its result files as
artifacts. It is tagged `sa_bench.cell` (the job directory below the output root, key
included), `sa_bench.key` and `sa_bench.sweep`. A cell that already has a run is not logged
again, unless it was rerun with `overwrite=true` (a new result). At the end of a sweep that
logged a cell, one more run tagged `sa_bench.kind=sweep` holds the report of the output root
(plots, report.md, report.html); a sweep with a failed cell exits (status 1) before Hydra's
`on_multirun_end`, so it logs its cells but no sweep run.

Where the logging happens: in the job's own process, in `on_job_end`, once the job returned
"done". Finished cells never reach the launcher, so a resumed sweep does no tracking work
for them (the parent does not even import mlflow); the job process exists under every
launcher (joblib, SLURM, Ray) and has the job's files at hand; a sweep that is killed keeps
the runs of the cells that finished. Hydra calls `on_job_end` callbacks in reverse order, so
this runs just before the completion marker is written, while the job still holds its
per-job lock: two sweeps never log one cell at once. Writers of one store are serialised by
a file lock (`<output_root>/.sa_bench/tracker.lock`): several workers may share a sqlite file.

The tracker never fails a cell: an error is appended to
`<output_root>/.sa_bench/tracker/<sweep>.errors`, and the sweep summary reports it once.
The sweep id is `$SA_BENCH_SWEEP` (set it to name a sweep; default: start time and pid), set
in the sweep's process before jobs start, so every job of the sweep inherits it.

Default stores: MLflow in `sqlite:///<output_root>/.sa_bench/mlflow/mlflow.db` (artifacts
beside it; view with `mlflow ui --backend-store-uri sqlite:///...`); W&B offline (runs under
`<output_root>/.sa_bench/wandb/`, `wandb sync` uploads them) unless WANDB_MODE says otherwise
or an API key is set (WANDB_API_KEY, or `wandb login`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback

from sa_bench.launch import jobdir

SWEEP_ENV = "SA_BENCH_SWEEP"
STATE = ".sa_bench"
SKIPPED_STATS = ("stats.lease.acquired", "stats.lease.released")
"""Numbers of stats.json that are clock readings, not measurements."""


# --- what a cell logs --------------------------------------------------------------------------


@dataclass
class CellRecord:
    cell: str  # the job directory below the output root: <model>/<sparse>/<benchmark>/<subset>/<key>
    key: str
    params: dict[str, str]
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cell.rsplit("/", 1)[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Every number in nested dicts under its dotted key; a list of numbers (per-layer values)
    as the mean of those that are not null."""
    if isinstance(data, dict):
        out: dict[str, float] = {}
        for key, value in data.items():
            out.update(numbers(value, f"{prefix}{key}."))
        return out
    if _is_number(data):
        return {prefix[:-1]: float(data)}
    if isinstance(data, list):
        values = [float(v) for v in data if _is_number(v)]
        return {prefix[:-1]: sum(values) / len(values)} if values else {}
    return {}


def cell_metrics(metrics: dict, stats: dict, density: float | None) -> dict[str, float]:
    out = numbers(metrics)
    if density is not None:
        out["density"] = density
    attention = stats.get("attention")
    phases = attention.get("density") if isinstance(attention, dict) else None
    if isinstance(phases, dict):
        out.update(numbers(phases, "density."))
    out.update({k: v for k, v in numbers(stats, "stats.").items()
                if k not in SKIPPED_STATS and not k.startswith("stats.attention.density.")})
    return out


def cell_record(root: Path, path: Path) -> CellRecord:
    """What a finished job directory logs, read as the report reads it (but without the
    completion marker: the tracker runs just before it is written)."""
    from sa_bench import report

    job = report.Job(path, report.printable(path.relative_to(root).as_posix()), "done",
                     report.read_config(path), report.read_object(path / jobdir.METRICS),
                     report.read_object(path / jobdir.STATS))
    params = {k: "null" if v is None else str(v)
              for k, v in report.flatten(report.result_values(job.config)).items()}
    params.update(key=path.name, cell=job.relpath)
    artifacts = [path / name for name in (jobdir.METRICS, jobdir.STATS, jobdir.PREDICTIONS,
                                          jobdir.CONFIG) if (path / name).is_file()]
    return CellRecord(job.relpath, path.name, params,
                      cell_metrics(job.metrics, job.stats, job.density), artifacts)


def safe_name(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, `_ - . / space`)."""
    return re.sub(r"[^\w\-. /]", "_", name)


# --- sweep bookkeeping -------------------------------------------------------------------------


def sweep_id() -> str:
    return os.environ.get(SWEEP_ENV) or "unnamed"


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text)


def _state_file(root: Path, suffix: str) -> Path:
    return root / STATE / "tracker" / f"{_file_name(sweep_id())}.{suffix}"


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.replace("\n", " ") + "\n")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def error_note(root: Path) -> str | None:
    """One line for the sweep summary when the tracker could not log some cells of this sweep."""
    errors = _lines(_state_file(root, "errors")) if SWEEP_ENV in os.environ else []
    if not errors:
        return None
    return (f"Tracker: {len(errors)} cell(s) not logged (the results are kept; "
            f"`python -m sa_bench.tracking {root}` logs them later); first error: {errors[0]}")


# --- the callback ------------------------------------------------------------------------------


class Tracker(Callback):
    """Logs each cell that finished in this sweep as one run (see the module docstring)."""

    name = ""
    package = ""  # the module that must be importable

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if importlib.util.find_spec(self.package) is None:
            print(f"Config error: +tracker={self.name} needs {self.package}: "
                  f"pip install 'sa_bench[{self.name}]'", flush=True)
            sys.exit(2)
        os.environ.setdefault(SWEEP_ENV, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
        root = Path(str(config.output_root)).expanduser()
        for suffix in ("errors", "logged"):
            _state_file(root, suffix).unlink(missing_ok=True)

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if not isinstance(result, dict) or result.get("status") != "done":
            return
        path = Path(result["dir"])
        self.log_dirs(path.parents[4], [path], rerun=bool(config.get("overwrite", False)))

    def log_dirs(self, root: Path, paths: list[Path], rerun: bool = False) -> int:
        """Log each job directory not logged yet; never raises. Returns how many were logged."""
        logged = 0
        for path in paths:
            try:
                record = cell_record(root, path)
                with store_lock(root):
                    if self.log_cell(root, record, rerun):
                        _append(_state_file(root, "logged"), record.cell)
                        logged += 1
            except Exception as exc:  # the tracker never fails a cell
                where = path.relative_to(root).as_posix() if path.is_relative_to(root) else path
                try:
                    _append(_state_file(root, "errors"), f"{where}: {type(exc).__name__}: {exc}")
                except OSError:
                    pass
        return logged

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(str(config.output_root)).expanduser()
        logged = _lines(_state_file(root, "logged"))
        if not logged:
            return  # nothing ran (or nothing could be logged): no report, no import
        try:
            with tempfile.TemporaryDirectory() as tmp:
                files = write_report(root, Path(tmp))
                with store_lock(root):
                    self.log_sweep(root, files)
            print(f"Tracker: {len(logged)} run(s) logged to {self.where(root)}", flush=True)
        except Exception as exc:
            print(f"Tracker: {len(logged)} run(s) logged to {self.where(root)}; the sweep's "
                  f"report was not ({type(exc).__name__}: {exc})", flush=True)

    # the store's own part
    def log_cell(self, root: Path, record: CellRecord, rerun: bool) -> bool:
        """Log one cell unless it has a run (and `rerun` is false); True when logged."""
        raise NotImplementedError

    def log_sweep(self, root: Path, files: list[Path]) -> None:
        raise NotImplementedError

    def where(self, root: Path) -> str:
        raise NotImplementedError


def store_lock(root: Path) -> Any:
    """The lock that serialises the writers of one output root's store."""
    from filelock import FileLock

    (root / STATE).mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / STATE / "tracker.lock"))


def write_report(root: Path, out: Path) -> list[Path]:
    """The report of the output root, written into `out`: its plots, report.md, report.html."""
    from sa_bench import report

    jobs = report.read_jobs(root)
    table = report.build_table(jobs)
    plots = report.write_plots(table, out)
    report.write_markdown(jobs, table, root, plots, out / "report.md")
    report.write_html(jobs, table, root, plots, out / "report.html")
    return [*plots, out / "report.md", out / "report.html"]


# --- MLflow ------------------------------------------------------------------------------------


class MlflowTracker(Tracker):
    name = package = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "sa_bench") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def uri(self, root: Path) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(root / STATE / 'mlflow' / 'mlflow.db').resolve()}"

    def where(self, root: Path) -> str:
        return f"{self.uri(root)} (mlflow ui --backend-store-uri {self.uri(root)})"

    def _client(self, root: Path) -> tuple[Any, str]:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial tables..."
        if not self.tracking_uri:
            (root / STATE / "mlflow").mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri(root))
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        artifacts = None if self.tracking_uri else \
            (root / STATE / "mlflow" / "artifacts").resolve().as_uri()
        return client, client.create_experiment(self.experiment, artifact_location=artifacts)

    def _find(self, client: Any, experiment: str, tag: str, value: str) -> list[Any]:
        value = value.replace("'", "\\'")
        return client.search_runs([experiment], f"tags.`{tag}` = '{value}'")

    def log_cell(self, root: Path, record: CellRecord, rerun: bool) -> bool:
        from mlflow.entities import Metric, Param

        client, experiment = self._client(root)
        runs = self._find(client, experiment, "sa_bench.key", record.key)
        if not rerun and any(r.data.tags.get("sa_bench.cell") == record.cell for r in runs):
            return False
        tags = {"sa_bench.cell": record.cell, "sa_bench.key": record.key,
                "sa_bench.sweep": sweep_id(), "sa_bench.kind": "cell"}
        run_id = client.create_run(experiment, run_name=record.name, tags=tags).info.run_id
        stamp = int(time.time() * 1000)
        params = [Param(safe_name(k), v) for k, v in sorted(record.params.items())]
        metrics = [Metric(safe_name(k), v, stamp, 0) for k, v in sorted(record.metrics.items())]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for path in record.artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
        return True

    def log_sweep(self, root: Path, files: list[Path]) -> None:
        client, experiment = self._client(root)
        runs = self._find(client, experiment, "sa_bench.sweep", sweep_id())
        sweep_runs = [r for r in runs if r.data.tags.get("sa_bench.kind") == "sweep"]
        if sweep_runs:
            run_id = sweep_runs[0].info.run_id
        else:
            tags = {"sa_bench.sweep": sweep_id(), "sa_bench.kind": "sweep"}
            run_id = client.create_run(experiment, run_name=f"sweep {sweep_id()}",
                                       tags=tags).info.run_id
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
        client.set_terminated(run_id)


# --- Weights & Biases --------------------------------------------------------------------------


def wandb_mode(explicit: str | None = None) -> str:
    """`explicit`, else $WANDB_MODE, else online with an API key (env or `wandb login`'s
    netrc entry), else offline."""
    if explicit:
        return explicit
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def wandb_run_id(cell: str, rerun: bool) -> str:
    """A run id from the cell (so a second log of it is found); a rerun gets a fresh one."""
    text = cell + (f"@{time.time()}" if rerun else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class WandbTracker(Tracker):
    name = package = "wandb"

    def __init__(self, project: str = "sa_bench", entity: str | None = None,
                 mode: str | None = None) -> None:
        self.project = project
        self.entity = entity
        self.mode = mode

    def where(self, root: Path) -> str:
        mode = wandb_mode(self.mode)
        if mode == "online":
            return f"W&B project {self.project}"
        return f"W&B ({mode}) under {root / STATE / 'wandb'} (upload: wandb sync)"

    def _exists(self, root: Path, run_id: str) -> bool:
        if wandb_mode(self.mode) != "online":
            return any((root / STATE / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
        import wandb

        try:
            wandb.Api().run(f"{self.entity or wandb.Api().default_entity}/{self.project}/{run_id}")
        except Exception:  # wandb.errors.CommError: no such run
            return False
        return True

    def _init(self, root: Path, **kwargs: Any) -> Any:
        import wandb

        (root / STATE / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(project=self.project, entity=self.entity, mode=wandb_mode(self.mode),
                          dir=str(root / STATE / "wandb"), reinit="create_new",
                          settings=wandb.Settings(quiet=True), **kwargs)

    def log_cell(self, root: Path, record: CellRecord, rerun: bool) -> bool:
        import wandb

        run_id = wandb_run_id(record.cell, rerun)
        if self._exists(root, run_id):
            return False
        run = self._init(root, id=run_id, name=record.name, config=record.params,
                         tags=[f"key:{record.key}", f"sweep:{sweep_id()}"[:64]],
                         group=sweep_id(), job_type="cell")
        try:
            run.summary.update(record.metrics)
            artifact = wandb.Artifact(f"cell-{run_id}", type="sa_bench-cell")
            for path in record.artifacts:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
        finally:
            run.finish()
        return True

    def log_sweep(self, root: Path, files: list[Path]) -> None:
        import wandb

        run = self._init(root, name=f"sweep {sweep_id()}", group=sweep_id(), job_type="sweep")
        try:
            run.log({p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"})
            artifact = wandb.Artifact(f"report-{_file_name(sweep_id())}", type="sa_bench-report")
            for path in files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
        finally:
            run.finish()


TRACKERS: dict[str, type[Tracker]] = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def main(argv: list[str] | None = None) -> int:
    """Log the finished cells of an output root that have no run yet (a sweep run without
    the tracker, or one whose tracker failed)."""
    from sa_bench import report

    parser = argparse.ArgumentParser(prog="python -m sa_bench.tracking", description=main.__doc__)
    parser.add_argument("output_root", type=Path)
    parser.add_argument("--tracker", choices=sorted(TRACKERS), default="mlflow")
    args = parser.parse_args(argv)
    tracker = TRACKERS[args.tracker]()
    os.environ.setdefault(SWEEP_ENV, "backfill-" + time.strftime("%Y%m%d-%H%M%S"))
    _state_file(args.output_root, "errors").unlink(missing_ok=True)
    done = [j.path for j in report.read_jobs(args.output_root) if j.status == "done"]
    logged = tracker.log_dirs(args.output_root, done)
    print(f"{len(done)} finished cells, {logged} logged to {tracker.where(args.output_root)}")
    note = error_note(args.output_root)
    if note:
        print(note)
    return 1 if note else 0


if __name__ == "__main__":
    sys.exit(main())
