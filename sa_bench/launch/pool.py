"""The device pool: every running job holds an exclusive lease on its device(s).

Leases are fcntl locks on files in `lock_dir` (one file per device slot), so a lease is
released by the operating system when its holder exits or is killed, and two sweeps on the
same machine share one pool. Jobs do not rely on CUDA_VISIBLE_DEVICES (joblib reuses worker
processes, and the variable only acts before CUDA starts): they place the model on the leased
ids explicitly. Without GPUs the pool has one "cpu" device. `simulate=true` leases the listed
ids without touching CUDA, so the pool can be tested on a machine with no GPU.

Beside each slot's lock its holder leaves `<slot>.holder.json` (pid, host, job directory, start
time), removed at release. A lease that has waited `REPORT_AFTER` seconds says so: one line on
stderr naming the holder(s), and `waiting.json` in its job directory while it waits, so the
sweep's progress line shows the job as waiting for that holder rather than as running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from sa_bench.config import ConfigError
from sa_bench.launch.jobdir import RUNNING, read_json, unusable_dir, write_json_atomic

LOCK_DIR_ENV = "SA_BENCH_LOCK_DIR"
"""Environment variable naming the default lock directory (the test suite sets its own)."""
WAITING = "waiting.json"
"""In a job directory while the job's lease waits: who it waits for (see `read_waiting`)."""
REPORT_AFTER = 5.0
"""Seconds a lease waits silently before it reports (stderr line, `waiting.json`)."""


@dataclass
class PoolConfig:
    devices: str | list[int] = "auto"
    """`auto`: every visible GPU (none: CPU); `cpu`; or a list of GPU ids."""
    jobs_per_device: int | str = "auto"
    """How many jobs may share one device (each holds one of its slots): an int >= 1, or `auto`.

    `auto` is 1 on a GPU (a job owns its GPU's memory). On the CPU it is
    max(1, usable cores // threads per job): a CPU is not a GPU - jobs share its memory like any
    processes and compete only for cores, so CPU jobs (of this sweep or of other sweeps on the
    machine) exclude each other only once their threads fill the cores. Threads per job is
    torch's intra-op thread count, read the way torch reads it without importing torch:
    `OMP_NUM_THREADS` when set, else one thread per core - then one job already keeps every core
    busy and a second would only oversubscribe them (OpenMP threads spinning against each other
    slow both), so `auto` is 1; with OMP_NUM_THREADS=k, cores // k jobs fit side by side. Usable
    cores are those this process may use (a SLURM or taskset mask, a container's quota). The sweep's
    parent (which sizes the launcher) and every job compute the same count from the same
    environment (joblib sets OMP_NUM_THREADS in its workers only where the parent left it unset,
    and then `auto` gives one job, run in the parent itself). Each CPU job loads its own copy of the model: set an int for large models.
    Not part of a job's identity: changing it changes no result directory.
    """
    devices_per_job: int = 1
    simulate: bool = False
    """Lease the listed ids but run on CPU (tests, dry runs)."""
    lock_dir: str | None = None
    """Where the lease files live. Default: `$SA_BENCH_LOCK_DIR` when set, else one folder per
    user in the system temp dir (`<tmp>/sa_bench-pool-<uid>`), shared by every sweep of that user
    on the machine - which is what keeps two sweeps off one GPU."""
    poll_seconds: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.devices, str) and self.devices not in ("auto", "cpu"):
            raise ConfigError(f"devices: expected 'auto', 'cpu' or a list of GPU ids, got {self.devices!r}")
        if isinstance(self.devices, list) and any(d < 0 for d in self.devices):
            raise ConfigError(f"devices: GPU ids must be >= 0, got {self.devices}")
        if isinstance(self.devices, list) and len(set(self.devices)) != len(self.devices):
            raise ConfigError(f"devices: each GPU id may be listed once, got {self.devices}")
        if not self.poll_seconds > 0:
            raise ConfigError(f"poll_seconds: expected a number > 0, got {self.poll_seconds}")
        if self.lock_dir is not None:
            problem = unusable_dir(Path(self.lock_dir).expanduser())
            if problem:
                raise ConfigError(f"lock_dir: expected a writable directory; {problem}")
        elif os.environ.get(LOCK_DIR_ENV):
            problem = unusable_dir(self.lock_path())
            if problem:
                raise ConfigError(f"lock_dir: {LOCK_DIR_ENV} must name a writable directory; {problem}")
        if isinstance(self.jobs_per_device, str):
            if self.jobs_per_device != "auto":
                raise ConfigError(
                    f"jobs_per_device: expected 'auto' or an int >= 1, got {self.jobs_per_device!r}")
        elif self.jobs_per_device < 1:
            raise ConfigError(
                f"jobs_per_device: expected an int >= 1 (or 'auto'), got {self.jobs_per_device}")
        if self.devices_per_job < 1:
            raise ConfigError(f"devices_per_job: expected an int >= 1, got {self.devices_per_job}")
        n = len(self.gpu_ids())
        if n and self.devices_per_job > n:
            raise ConfigError(
                f"devices_per_job: {self.devices_per_job} devices per job but the pool has {n}"
            )

    def check_visible(self) -> None:
        """Listed GPU ids must exist on this machine (unless simulated): fail before any job."""
        if self.simulate or not isinstance(self.devices, list):
            return
        n = visible_gpu_count()
        missing = [d for d in self.devices if d >= n]
        if missing:
            raise ConfigError(
                f"devices: GPU id(s) {missing} requested but this machine has {n} visible GPU(s); "
                "use pool.devices=auto or cpu (or pool.simulate=true to test the pool)"
            )

    def gpu_ids(self) -> list[int]:
        if self.devices == "cpu":
            return []
        if self.devices == "auto":
            return list(range(visible_gpu_count()))
        return list(self.devices)

    def slots_per_device(self, gpus: list[int] | None = None) -> int:
        """`jobs_per_device` with `auto` resolved (`gpus`: `gpu_ids()` when already known)."""
        if isinstance(self.jobs_per_device, int):
            return self.jobs_per_device
        return 1 if (self.gpu_ids() if gpus is None else gpus) else cpu_slots()

    def n_parallel(self) -> int:
        """How many jobs can hold leases at once (the launcher's n_jobs)."""
        gpus = self.gpu_ids()
        per = self.slots_per_device(gpus)
        if not gpus:
            return per
        return max(1, len(gpus) // self.devices_per_job) * per

    def lock_path(self) -> Path:
        if self.lock_dir:
            return Path(self.lock_dir).expanduser()
        env = os.environ.get(LOCK_DIR_ENV)
        if env:
            return Path(env).expanduser()
        return Path(tempfile.gettempdir()) / f"sa_bench-pool-{os.getuid()}"


def usable_cpus() -> int:
    """CPUs this process may use: joblib's count (the launcher's), which honours an affinity
    mask (SLURM, taskset) and a container's CPU quota; else the affinity mask."""
    try:
        from joblib.externals.loky import cpu_count
    except ImportError:
        try:
            return len(os.sched_getaffinity(0)) or 1
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return max(1, cpu_count())


def threads_per_job() -> int | None:
    """torch's intra-op thread count as `OMP_NUM_THREADS` sets it; None when unset (every core)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def cpu_slots() -> int:
    """`jobs_per_device=auto` on the CPU: how many jobs' threads fit on the usable cores."""
    cores = usable_cpus()
    return max(1, cores // (threads_per_job() or cores))


def visible_gpu_count() -> int:
    """GPUs this process may use, without importing torch (the sweeper runs in the parent).

    CUDA_VISIBLE_DEVICES (set by a scheduler such as SLURM) wins; else `nvidia-smi -L`.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def machine_id(index: int | str) -> str:
    """The name of visible device `index` shared by every process on this machine.

    A scheduler (SLURM, Ray) gives each job its GPUs through CUDA_VISIBLE_DEVICES, so index 0
    of two jobs on one node can be two different GPUs: their leases must not collide.
    """
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    name = visible[index] if isinstance(index, int) and index < len(visible) else str(index)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class Lease:
    devices: list[int]
    """GPU ids this job may use; [] means CPU."""
    simulated: bool
    slots: list[str] = field(default_factory=list)
    acquired: float = 0.0
    waited: float = 0.0

    @property
    def torch_devices(self) -> list[int]:
        """What the model should be placed on: nothing (CPU) when simulated."""
        return [] if self.simulated else self.devices


@contextmanager
def lease(cfg: PoolConfig, job_dir: Path | None = None) -> Iterator[Lease]:
    """Block until `devices_per_job` devices each have a free slot; hold them until exit.

    Taking several devices happens under one pool-wide mutex, all or nothing, so two
    multi-device jobs can never deadlock holding half of what each needs. `job_dir` (the
    job's directory) is named in the holder files and gets `waiting.json` while the lease
    waits longer than `REPORT_AFTER` seconds.
    """
    cfg.check_visible()
    root = cfg.lock_path()
    root.mkdir(parents=True, exist_ok=True)
    gpus = cfg.gpu_ids()
    ids: list[int | str] = list(gpus) or ["cpu"]
    want = cfg.devices_per_job if gpus else 1
    per = cfg.slots_per_device(gpus)
    mutex = FileLock(str(root / "pool.mutex"))
    start = time.monotonic()
    if not gpus:
        wants = "a cpu slot"
    else:
        listed = ", ".join(map(str, gpus))
        wants = f"a slot on GPU {listed}" if want == 1 else f"slots on {want} of GPU {listed}"
    report = _WaitReport(job_dir, wants, root)
    report.clear()  # a killed earlier attempt's
    held: list[tuple[int | str, FileLock]] = []
    try:
        while True:
            busy: list[str] = []
            with mutex:
                for dev in ids:
                    for slot in range(per):
                        lock = FileLock(str(root / f"dev-{machine_id(dev)}.slot-{slot}.lock"))
                        try:
                            lock.acquire(timeout=0)
                        except Timeout:
                            busy.append(lock.lock_file)
                            continue
                        held.append((dev, lock))
                        break
                    if len(held) == want:
                        break
                if len(held) == want:
                    break
                for _, lock in held:
                    lock.release()
                held = []
            waited = time.monotonic() - start
            if waited >= REPORT_AFTER:
                report.update(busy, waited)
            time.sleep(cfg.poll_seconds)
        report.clear()
        for dev, lock in held:
            _write_holder(lock.lock_file, dev, job_dir)
        devices = [d for d, _ in held if d != "cpu"]
        result = Lease(
            devices=devices,  # type: ignore[arg-type]
            simulated=cfg.simulate,
            slots=[lock.lock_file for _, lock in held],
            acquired=time.time(),
            waited=time.monotonic() - start,
        )
        yield result
    finally:
        report.clear()
        for _, lock in held:
            holder_path(lock.lock_file).unlink(missing_ok=True)
            lock.release()


# ---------------------------------------------------------------- who holds a slot, who waits

def holder_path(lock_file: str | Path) -> Path:
    """`dev-cpu.slot-0.lock` -> `dev-cpu.slot-0.holder.json`, beside it."""
    return Path(lock_file).with_suffix(".holder.json")


def _write_holder(lock_file: str, dev: int | str, job_dir: Path | None) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "device": str(dev),
            "cell": str(job_dir) if job_dir is not None else None, "started": time.time()}
    try:
        write_json_atomic(holder_path(lock_file), info)
    except OSError:
        pass  # only informative: a lease never fails because of it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def _valid(info: object) -> bool:
    """A record with an int pid, not left behind by a dead process on this machine."""
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) \
            or isinstance(info.get("pid"), bool):
        return False
    return info.get("host") != socket.gethostname() or _alive(info["pid"])


def read_holder(lock_file: str | Path) -> dict | None:
    """Who holds the slot locked through `lock_file`: None if unknown (no file, unreadable, or
    written by a process that is gone - a killed holder cannot remove its file)."""
    info = read_json(holder_path(lock_file))
    return info if _valid(info) else None


def read_waiting(job_dir: Path) -> dict | None:
    """The job's `waiting.json` when it describes a live wait by the job's own process."""
    info = read_json(Path(job_dir) / WAITING)
    if not _valid(info):
        return None
    running = read_json(Path(job_dir) / RUNNING)
    if isinstance(running, dict) and running.get("pid") not in (None, info["pid"]):
        return None  # left by an earlier attempt
    holders = info.get("holders")
    info["holders"] = [h for h in holders if isinstance(h, dict)] if isinstance(holders, list) else []
    return info


def short_cell(cell: str | None) -> str:
    """`<root>/<model>/<sparse>/<benchmark>/<subset>/<key>` -> `<model>/.../<subset>`."""
    if not cell:
        return "no job directory"
    parts = Path(cell).parts
    return "/".join(parts[-5:-1]) if len(parts) >= 6 else cell


def describe_holders(holders: list[dict], full: bool = False) -> str:
    """`pid 123 on host (model/sparse/bench/subset)` for each holder (at most two)."""
    if not holders:
        return "an unrecorded holder (an older sa_bench, or one just starting)"
    named = []
    for h in holders[:2]:
        cell = h.get("cell") if isinstance(h.get("cell"), str) else None
        where = (cell or "no job directory") if full else short_cell(cell)
        named.append(f"pid {h.get('pid', '?')} on {h.get('host', '?')} ({where})")
    return ", ".join(named) + (f" and {len(holders) - 2} more" if len(holders) > 2 else "")


class _WaitReport:
    """What a waiting lease tells: `waiting.json` in its job directory, one line on stderr."""

    def __init__(self, job_dir: Path | None, wants: str, root: Path) -> None:
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.wants = wants
        self.root = root
        self.since = time.time()
        self.holders: list[dict] | None = None
        self.logged = False

    def update(self, busy: list[str], waited: float) -> None:
        holders = [h for h in map(read_holder, busy) if h is not None]
        if self.job_dir is not None and holders != self.holders:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "wants": self.wants,
                    "since": self.since, "holders": holders, "lock_dir": str(self.root)}
            try:
                write_json_atomic(self.job_dir / WAITING, info)
            except OSError:
                pass  # only informative
        self.holders = holders
        if not self.logged:
            self.logged = True
            who = f"job {self.job_dir}" if self.job_dir is not None else f"pid {os.getpid()}"
            print(f"[sa_bench] {who} has waited {waited:.0f} s for {self.wants}, held by "
                  f"{describe_holders(holders, full=True)} (pool {self.root})",
                  file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.job_dir is not None:
            try:
                (self.job_dir / WAITING).unlink(missing_ok=True)
            except OSError:
                pass
        self.holders = None
