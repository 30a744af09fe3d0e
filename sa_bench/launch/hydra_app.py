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


def sweep_dependent_overrides(argv: list[str]) -> list[str]:
    """`argv` with each plain override under a swept config group made a one-value sweep.

    Every run is a multirun (conf/config.yaml), and a multirun composes its first config
    without the sweeps, so in `sparse=snapkv,knorm sparse.compression.compression_ratio=0.5`
    the ratio would be set on the default `sparse` (dense, which has no `compression`) and
    Hydra refuses the command. As `choice(0.5)` it is applied to each job's own composition,
    as the ratio list `0.25,0.5` already is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    places = [i for i, arg in enumerate(argv) if i > 0 and "=" in arg and not arg.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides([argv[i] for i in places])
    except HydraException:
        return argv  # Hydra says what is wrong with it
    swept = {o.key_or_group for o in parsed
             if o.is_sweep_override() and "." not in o.key_or_group
             and (CONF_DIR / o.key_or_group).is_dir()}
    out = list(argv)
    for i, o in zip(places, parsed, strict=True):
        if (o.type == OverrideType.CHANGE and not o.is_sweep_override() and o.package is None
                and o.key_or_group.split(".")[0] in swept and "." in o.key_or_group):
            out[i] = f"{o.key_or_group}=choice({o.get_value_element_as_str()})"
    return out
