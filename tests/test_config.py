from dataclasses import dataclass, field
from typing import Literal

import pytest

from sa_bench.config import ConfigError, Size, build, build_target, check_range


@dataclass
class Inner:
    size: Size = 4

    def __post_init__(self):
        check_range(self.size, "size", low=0)


@dataclass
class Outer:
    name: str
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    layers: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_build_accepts_valid_values_and_converts_int_to_float():
    out = build(Outer, {"name": "x", "ratio": 1, "layers": [0, 1], "inner": {"size": 0.25}}, "s")
    assert out.ratio == 1.0 and isinstance(out.ratio, float)
    assert out.inner.size == 0.25 and out.layers == [0, 1]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "bogus": 1}, "s.bogus: unknown key"),
        ({}, "s.name: missing required key"),
        ({"name": "x", "ratio": "abc"}, "s.ratio: expected a float, got 'abc'"),
        ({"name": "x", "mode": "c"}, "s.mode: expected one of ['a', 'b']"),
        ({"name": "x", "layers": [0, "one"]}, "s.layers[1]: expected an int"),
        ({"name": "x", "inner": {"size": 1.5}}, "s.inner.size: a fraction must be in (0, 1]"),
        ({"name": "x", "inner": {"size": -3}}, "s.inner.size: a token count must be >= 0"),
        ({"name": "x", "inner": {"size": "abc"}}, "s.inner.size: expected an int token count"),
    ],
)
def test_build_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        build(Outer, data, "s")
    assert message in str(err.value)


def test_build_target_imports_and_checks_base():
    obj = build_target({"_target_": "tests.test_config.Inner", "size": 3}, "k", Inner)
    assert isinstance(obj, Inner) and obj.size == 3
    with pytest.raises(ConfigError, match="k._target_: cannot import module"):
        build_target({"_target_": "no_such_module.X"}, "k")
    with pytest.raises(ConfigError, match="is not a Inner subclass"):
        build_target({"_target_": "tests.test_config.Outer", "name": "x"}, "k", Inner)
