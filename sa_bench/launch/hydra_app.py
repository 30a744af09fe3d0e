"""Where the config tree is, and the Hydra entry point around a task function.

The tree lives at the top of the repository (`conf/`) and is reached through `sa_bench/conf`,
a link in a source checkout and a real folder in an installed wheel (setuptools copies the
files it links to), so the same path works for editable and non-editable installs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

CONF_DIR = (Path(__file__).resolve().parent.parent / "conf").resolve()


def hydra_main(task_function: Callable[[Any], Any]) -> Callable[[], Any]:
    """`task_function` wrapped as Hydra's `@hydra.main` over the package's config tree."""
    import hydra

    import sa_bench.launch.resolvers  # noqa: F401  (resolvers used by conf/config.yaml)

    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(f"sa_bench's config tree is missing: no {CONF_DIR}/config.yaml")
    return hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(
        task_function
    )
