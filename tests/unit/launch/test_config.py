from dataclasses import dataclass, field
from typing import Literal

import pytest

from sa_bench.config import ConfigError, Size, build, build_target, check_range
from tests.conftest import ROOT


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
    obj = build_target({"_target_": "tests.unit.launch.test_config.Inner", "size": 3}, "k", Inner)
    assert isinstance(obj, Inner) and obj.size == 3
    with pytest.raises(ConfigError, match="k._target_: cannot import module"):
        build_target({"_target_": "no_such_module.X"}, "k")
    with pytest.raises(ConfigError, match="is not a Inner subclass"):
        build_target({"_target_": "tests.unit.launch.test_config.Outer", "name": "x"}, "k", Inner)


@dataclass
class Named:
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    path: str | None = None


@pytest.mark.parametrize("data, message", [
    ({"tags": [512]}, "s.tags[0]: expected a str, got an int 512: YAML and Hydra read an unquoted "
                      "512 as an int; quote it: s.tags=['512'] (in a shell: \"s.tags=['512']\""),
    ({"tags": ["1k", 512]}, "s.tags[1]: expected a str, got an int 512: YAML and Hydra read an "
                            "unquoted 512 as an int; quote it: s.tags=['1k','512']"),
    ({"name": True}, "s.name: expected a str, got a bool True: YAML and Hydra read an unquoted "
                     "true as a bool; quote it: s.name='true'"),
    ({"path": 1.5}, "s.path: expected a str, got a float 1.5: YAML and Hydra read an unquoted 1.5 "
                    "as a float; quote it: s.path='1.5'"),
])
def test_a_number_or_bool_for_a_str_says_how_to_quote_it(data, message):
    with pytest.raises(ConfigError) as err:
        build(Named, data, "s")
    assert str(err.value).startswith(message)


SIDE_EFFECT_MODULE = '''
import pathlib
pathlib.Path(__file__).with_suffix(".ran").write_text("imported")
print("side effect of importing")
s = """a string, as in `this`"""
def helper():
    return 1
class Real:
    pass
'''


def test_a_target_that_is_not_a_class_is_refused_before_its_module_runs(tmp_path, monkeypatch, capsys):
    """`_target_=this.s` (a string in a module that prints on import) is refused from the
    module's source, without running it; a class in it is imported as before."""
    from sa_bench import config

    (tmp_path / "sideeffect_mod.py").write_text(SIDE_EFFECT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ran = tmp_path / "sideeffect_mod.ran"
    lookups = []
    real_find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *a: lookups.append(name) or real_find_spec(name, *a))
    for target, message in [
        ("sideeffect_mod.s", "k._target_: sideeffect_mod.s is not a class (module sideeffect_mod "
                             "binds s to a literal value); expected the dotted path of a Inner subclass"),
        ("sideeffect_mod.helper", "k._target_: sideeffect_mod.helper is not a class (module "
                                  "sideeffect_mod binds helper to a function)"),
        ("sideeffect_mod.Missing", "k._target_: module 'sideeffect_mod' has no attribute 'Missing'"),
    ]:
        for _ in range(3):  # a sweep builds the same target for every cell: read once
            with pytest.raises(ConfigError) as err:
                build_target({"_target_": target}, "k", Inner)
            assert str(err.value).startswith(message)
    assert lookups == ["sideeffect_mod"] * 3
    assert not ran.exists() and "side effect" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="sideeffect_mod.Real is not a Inner subclass"):
        build_target({"_target_": "sideeffect_mod.Real"}, "k", Inner)
    assert ran.exists()  # a class: imported, then checked as before
    with pytest.raises(ConfigError, match="k._target_: math.pi is not a Inner subclass"):
        build_target({"_target_": "math.pi"}, "k", Inner)  # no source (built in): imported
    with pytest.raises(ConfigError, match=r"cannot import module 'tests.no_such'"):
        build_target({"_target_": "tests.no_such.X"}, "k", Inner)


def test_every_model_option_is_in_every_model_yaml():
    """Each ModelConfig field is a key of each conf/model/*.yaml, so `model.<option>=...` works
    without Hydra's `+` (as the README writes it)."""
    import dataclasses

    import yaml

    from sa_bench.models.loading import ModelConfig

    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    files = sorted((ROOT / "conf" / "model").glob("*.yaml"))
    assert len(files) >= 2
    for file in files:
        data = yaml.safe_load(file.read_text())
        missing = [name for name in fields if name not in data]
        assert not missing, f"{file.name} lacks {missing}"
