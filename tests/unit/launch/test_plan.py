"""plan.expand applies value overrides to a composed dict itself (one Hydra composition per
config-group combination, not per cell). Here it is checked against Hydra's own composition
of every cell's override list, for many random (seeded) override lists covering every
override kind it supports: set, sweep (a,b / range), `+` add, `++` force-add, `~` delete,
dict values (merged into an existing dict), interpolations, quoted strings, group choices."""

from __future__ import annotations

import copy
import random

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import sa_bench.launch.resolvers  # noqa: F401  (conf/config.yaml uses them)
from sa_bench.config import ConfigError
from sa_bench.launch.hydra_app import CONF_DIR
from sa_bench.launch.plan import expand


@pytest.fixture(scope="module")
def hydra():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        groups = set(GlobalHydra.instance().config_loader().list_groups(""))
        yield groups
    GlobalHydra.instance().clear()


def hydra_config(overrides: list[str], resolve: bool) -> dict:
    cfg = compose(config_name="config", overrides=overrides)
    return {k: OmegaConf.to_container(cfg[k], resolve=resolve) if OmegaConf.is_config(cfg[k])
            else cfg[k] for k in cfg if k != "hydra"}


def plan(overrides: list[str], groups: set[str]):
    parsed = OverridesParser.create().parse_overrides(overrides)
    return expand(parsed, groups, lambda group_overrides: hydra_config(group_overrides, False))


GROUPS = {
    "model": ["tiny", "smollm2-135m"],
    "sparse": ["dense", "streaming", "oracle_topk", "quest"],
    "benchmark": ["passkey", "niah"],
}
# (override, applies to any group choice) — each exercises one override kind
VALUES = [
    "seed=3", "seed=0,1", "seed=range(2,4)", "max_new_tokens=7", "max_new_tokens=null",
    "max_new_tokens=${seed}", "overwrite=true", "output_root=/tmp/x",
    "model.max_context=1024,2048", "model.dtype=bfloat16", "model.name='my model'",
    "+model.chat_template_kwargs={enable_thinking: false}",
    "sparse.phase=decode", "sparse.dense_layers=[0,1]", "sparse.seed=5",
    "+sparse.maskers.extra={_target_: sa_bench.attention.maskers.Sink, size: 2}",
    "++sparse.maskers.sink={_target_: sa_bench.attention.maskers.Sink, size: 8}",
    "++sparse.measure_error=true", "+model.note=hello", "++seed=9",
    "benchmark.max_samples=3", "benchmark.subsets=[1k]", "benchmark.subset=2k",
    "benchmark.seed=4,5", "pool.devices=cpu", "~pool.simulate", "~model.chat_template",
    "sparse.maskers={}", "+model.revision=abc",
]


FIXED = [
    ["model=tiny", "~model.name=tiny"],  # delete with the current value
    ["sparse=streaming", "~sparse.maskers.sink", "sparse.maskers.local.size=8,0.5"],
    ["benchmark=passkey,niah", "benchmark.subset=2k,1k"],
]


def random_overrides(rng: random.Random) -> list[str]:
    out = []
    for group, names in GROUPS.items():
        if rng.random() < 0.6:
            out.append(f"{group}={','.join(rng.sample(names, rng.choice([1, 1, 2])))}")
    keys = set()
    for value in rng.sample(VALUES, rng.randint(1, 5)):
        key = value.split("=", 1)[0].lstrip("+~")
        if key not in keys:  # Hydra refuses one key twice in a sweep
            keys.add(key)
            out.append(value)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(30 + len(FIXED)))
def test_expand_equals_hydra_composition(hydra, seed):
    overrides = FIXED[seed - 30] if seed >= 30 else random_overrides(random.Random(seed))
    cells = plan(overrides, hydra)
    assert cells, overrides
    sweep_sizes = 1
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            sweep_sizes *= len(list(o.sweep_string_iterator()))
    per_combo: dict[tuple, list] = {}
    for cell in cells:
        expected = hydra_config(cell.overrides, resolve=True)
        assert cell.config == expected, (overrides, cell.overrides)
        combo = tuple(o for o in cell.overrides if not o.startswith("++benchmark.subset="))
        per_combo.setdefault(combo, []).append(cell.config["benchmark"])
    assert len(per_combo) == sweep_sizes
    for benches in per_combo.values():  # one cell per subset, unless the subset was given
        subsets = [b["subset"] for b in benches]
        given = [o.split("=", 1)[1].split(",") for o in overrides if o.startswith("benchmark.subset=")]
        if given:
            assert len(subsets) == 1 and subsets[0] in given[0]
        else:
            assert subsets == benches[0]["subsets"]


ERRORS = [
    ["+seed=1"],                          # `+` on an existing key
    ["sparse.nonexistent=1"],             # set of an unknown key
    ["~sparse.maskers.sink", "sparse=dense"],  # delete of a key that is not there
    ["model.bogus.deep=1"],               # unknown parent
    ["~model.revision"],                  # delete of a null value (Hydra: "does not exist")
    ["~seed=5"],                          # delete with a value that is not the current one
    ["seed.x=1"],                         # a child of a value
]


@pytest.mark.parametrize("overrides", ERRORS)
def test_expand_refuses_what_hydra_refuses(hydra, overrides):
    with pytest.raises((HydraException, OmegaConfBaseException, ValueError)):
        hydra_config(overrides, resolve=True)
    with pytest.raises(ConfigError):
        plan(overrides, hydra)


def test_value_overrides_do_not_touch_the_shared_composition(hydra):
    base = hydra_config([], resolve=False)
    snapshot = copy.deepcopy(base)
    cells = plan(["sparse.dense_layers=[0],[1]", "+model.chat_template_kwargs={a: 1}"], hydra)
    assert [c.config["sparse"]["dense_layers"] for c in cells][::2] == [[0], [1]]
    assert hydra_config([], resolve=False) == snapshot
