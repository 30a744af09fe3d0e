"""The Hydra application: config tree, task function, resolvers."""

from pathlib import Path

import hydra

import sa_bench.launch.resolvers  # noqa: F401  (resolvers used by conf/config.yaml)
from sa_bench.job import run_job

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")

hydra_main = hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)(run_job)
