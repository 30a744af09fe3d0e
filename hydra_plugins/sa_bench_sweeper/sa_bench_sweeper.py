"""The sa_bench sweeper: Hydra's basic sweeper that never launches a finished cell.

It expands the sweep (one cell per benchmark subset; composing once per group combination,
not per cell), validates every cell and computes its directory once (handed to its job as
`cell=...`), drops finished cells, launches the rest, and prints a summary. A launch that
breaks (a worker killed, out of memory) is retried for the cells still unfinished.
"""

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import sa_bench.launch.resolvers  # noqa: F401  (registers resolvers in the parent)
from sa_bench import tracking
from sa_bench.config import ConfigError
from sa_bench.fingerprint import FingerprintCache
from sa_bench.launch import jobdir, outcome, preflight
from sa_bench.launch.identity import Inputs
from sa_bench.launch.jobdir import Status
from sa_bench.launch.plan import Cell, expand, identify, plan_table, refresh_status
from sa_bench.launch.progress import Progress
from sa_bench.models.loading import offline_by_env

log = logging.getLogger(__name__)


@dataclass
class SaBenchSweeperConf:
    _target_: str = "hydra_plugins.sa_bench_sweeper.sa_bench_sweeper.SaBenchSweeper"
    max_batch_size: int | None = None
    launch_attempts: int = 3
    """How often cells left unfinished by a broken launch (a killed worker) are relaunched."""


ConfigStore.instance().store(group="hydra/sweeper", name="sa_bench", node=SaBenchSweeperConf)


def say(text: str) -> None:
    print(text, flush=True)


class SaBenchSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, launch_attempts: int = 3) -> None:
        super().__init__(max_batch_size=max_batch_size, params=None)
        self.launch_attempts = launch_attempts
        self.disk_full = False
        self.hub_note: str | None = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        # The launcher's n_jobs is derived from the pool: check the pool first, readably.
        try:
            preflight.check_pool(config)
        except ConfigError as exc:
            say(f"Config error: {exc}")
            sys.exit(2)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        loader = self.hydra_context.config_loader
        try:
            root = preflight.check_job_dirs(self.config)
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
            groups = set(loader.list_groups(""))
            cells = expand(overrides, groups, self._compose)
            # before the keys: whether an offline fallback will be loaded is part of them
            self.hub_note = preflight.decide_hub([c.config for c in cells])
            device = preflight.job_device(self.config, preflight.check_pool(self.config))
            inputs = Inputs(device, offline_by_env(), FingerprintCache.in_root(root))
            cells, invalid = identify(cells, inputs)
        except OmegaConfBaseException as exc:  # e.g. an unset ${oc.env:...}
            say(f"Config error: {preflight.config_error(exc)}")
            sys.exit(2)
        except ConfigError as exc:
            say(f"Config error: {exc}")
            sys.exit(2)
        plan = bool(self.config.get("plan", False))
        if invalid and not plan:
            errors = list(dict.fromkeys(c.error for c in invalid))
            say(f"Config error in {len(invalid)} of {len(cells) + len(invalid)} jobs; nothing was run:")
            for message in errors[:20]:
                say(f"  {message}")
            sys.exit(2)
        refresh_status(cells)
        overwrite = bool(self.config.get("overwrite", False))
        todo = [c for c in cells if overwrite or c.status not in (Status.DONE, Status.RUNNING)]
        done = sum(c.status == Status.DONE for c in cells)
        running = sum(c.status == Status.RUNNING for c in cells)
        line = f"{len(cells)} jobs: {done} done (skipped), {len(todo)} to run"
        if overwrite:
            line = f"{len(cells)} jobs: overwrite=true, {len(todo)} to run"
        if running and not overwrite:
            line += f", {running} running elsewhere (skipped)"
        if plan:
            line = line.replace(f"{len(cells)} jobs:", f"{len(cells) + len(invalid)} jobs:", 1)
            line += f", {len(invalid)} invalid (config errors below)" if invalid else ""
            say(line)
            say(plan_table(cells + invalid))
            if invalid:
                sys.exit(2)
            return []  # a plan changes nothing, not even the file-hash cache
        inputs.cache.save()  # best effort: a read-only root hashes again next time
        say(line)
        if not todo:
            return []
        try:
            preflight.check_writable(root)
        except ConfigError as exc:
            say(f"Config error: {exc}")
            sys.exit(2)
        started = time.time()
        returns = self._launch(todo)
        self._summary(root, cells, todo, started, returns)
        return returns

    def _compose(self, group_overrides: list[str]) -> dict:
        cfg = self.hydra_context.config_loader.load_sweep_config(  # type: ignore[union-attr]
            master_config=self.config, sweep_overrides=group_overrides
        )
        return {k: OmegaConf.to_container(cfg[k], resolve=False) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}

    def _launch(self, todo: list[Cell]) -> list[Any]:
        returns: list[Any] = []
        pending = todo
        progress = Progress(todo)
        progress.start()
        # the launcher's per-job "Launching jobs ... #0 : ..." lines would bury the progress line
        logging.getLogger("hydra_plugins").setLevel(logging.WARNING)
        try:
            for attempt in range(self.launch_attempts):
                try:
                    results = self.launcher.launch([c.overrides for c in pending], initial_job_idx=0)  # type: ignore[union-attr]
                    returns.append(results)
                    break
                except Exception as exc:  # a broken worker pool: relaunch what is unfinished
                    if jobdir.disk_full(exc):  # relaunching cannot help
                        say(f"Launch stopped: disk full ({exc}); free space under "
                            f"{self.config.output_root} and rerun")  # type: ignore[union-attr]
                        self.disk_full = True
                        break
                    refresh_status(pending)
                    pending = [c for c in pending if c.status not in (Status.DONE, Status.FAILED)]
                    say(
                        f"Launch broke ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        f"{len(pending)} unfinished jobs"
                        + (", relaunching" if pending and attempt + 1 < self.launch_attempts else "")
                    )
                    if not pending:
                        break
        finally:
            progress.stop()
        return returns

    def _summary(self, root: Path, cells: list[Cell], todo: list[Cell], started: float,
                 returns: list[Any]) -> None:
        refresh_status(todo)
        ran = [c for c in todo if c.status == Status.DONE]
        elsewhere = [c for c in todo if c.status == Status.RUNNING]
        failed = [c for c in todo if c.status in (Status.FAILED, Status.PENDING)]
        say(
            f"Sweep finished in {time.time() - started:.1f}s: {len(ran)} done, "
            f"{len(cells) - len(todo)} skipped, {len(failed)} failed"
            + (f", {len(elsewhere)} still running in another sweep" if elsewhere else "")
        )
        errors = outcome.job_errors(todo, returns)
        for cell in failed:
            say(f"  FAILED {cell.path}\n         {outcome.failure_reason(cell.path, errors.get(cell.relpath), self.disk_full)}")
        note = outcome.fallback_note([c.path for c in ran], self.hub_note)
        if note:
            say(note)
        for cell in ran:
            summary = (jobdir.read_json(cell.path / jobdir.MARKER) or {}).get("summary", {})
            if summary.get("score") is not None:
                say(f"  score {summary['score']:7.2f}  {cell.path}")
        note = tracking.error_note(root)  # +tracker: cells it could not log, said once
        if note:
            say(note)
        if failed:
            sys.exit(1)


__all__ = ["SaBenchSweeper", "SaBenchSweeperConf"]
