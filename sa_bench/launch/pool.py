"""The device pool: every running job holds an exclusive lease on its device(s).

Leases are fcntl locks on files in `lock_dir` (one file per device slot), so a lease is
released by the operating system when its holder exits or is killed, and two sweeps on the
same machine share one pool. Jobs do not rely on CUDA_VISIBLE_DEVICES (joblib reuses worker
processes, and the variable only acts before CUDA starts): they place the model on the leased
ids explicitly. Without GPUs the pool has one "cpu" device. `simulate=true` leases the listed
ids without touching CUDA, so the pool can be tested on a machine with no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from sa_bench.config import ConfigError
from sa_bench.launch.jobdir import unusable_dir


@dataclass
class PoolConfig:
    devices: str | list[int] = "auto"
    """`auto`: every visible GPU (none: CPU); `cpu`; or a list of GPU ids."""
    jobs_per_device: int = 1
    devices_per_job: int = 1
    simulate: bool = False
    """Lease the listed ids but run on CPU (tests, dry runs)."""
    lock_dir: str | None = None
    """Where the lease files live; default: one folder per user in the system temp dir."""
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
        if self.jobs_per_device < 1:
            raise ConfigError(f"jobs_per_device: expected an int >= 1, got {self.jobs_per_device}")
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

    def n_parallel(self) -> int:
        """How many jobs can hold leases at once (the launcher's n_jobs)."""
        n = len(self.gpu_ids())
        if n == 0:
            return self.jobs_per_device
        return max(1, n // self.devices_per_job) * self.jobs_per_device

    def lock_path(self) -> Path:
        if self.lock_dir:
            return Path(self.lock_dir)
        return Path(tempfile.gettempdir()) / f"sa_bench-pool-{os.getuid()}"


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
def lease(cfg: PoolConfig) -> Iterator[Lease]:
    """Block until `devices_per_job` devices each have a free slot; hold them until exit.

    Taking several devices happens under one pool-wide mutex, all or nothing, so two
    multi-device jobs can never deadlock holding half of what each needs.
    """
    cfg.check_visible()
    root = cfg.lock_path()
    root.mkdir(parents=True, exist_ok=True)
    ids: list[int | str] = list(cfg.gpu_ids()) or ["cpu"]
    want = cfg.devices_per_job if cfg.gpu_ids() else 1
    mutex = FileLock(str(root / "pool.mutex"))
    start = time.monotonic()
    held: list[tuple[int | str, FileLock]] = []
    while True:
        with mutex:
            for dev in ids:
                for slot in range(cfg.jobs_per_device):
                    lock = FileLock(str(root / f"dev-{machine_id(dev)}.slot-{slot}.lock"))
                    try:
                        lock.acquire(timeout=0)
                    except Timeout:
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
        time.sleep(cfg.poll_seconds)
    devices = [d for d, _ in held if d != "cpu"]
    result = Lease(
        devices=devices,  # type: ignore[arg-type]
        simulated=cfg.simulate,
        slots=[lock.lock_file for _, lock in held],
        acquired=time.time(),
        waited=time.monotonic() - start,
    )
    try:
        yield result
    finally:
        for _, lock in held:
            lock.release()
