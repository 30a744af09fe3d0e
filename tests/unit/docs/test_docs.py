"""Every command shown in README.md and docs/*.md parses.

`python -m sa_bench ...` lines: their Hydra overrides compose against `conf/` (through Hydra's
compose API, once per distinct set of overrides: the multirun base config with the non-swept
overrides, then every combination of swept config-group choices with the first value of each
other sweep), so a key that does not exist, a config group option that does not exist or a
missing `+`/`++` fails here. `python -m sa_bench.<module> ...` lines: the module exists, its
`--help` exits 0 and names every `--option` the line uses. Lines with placeholders (`<model>`,
`...`) are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from sa_bench.launch.hydra_app import CONF_DIR
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.")
GROUPS = {"model", "sparse", "benchmark", "tracker", "hydra/launcher"}
MINE = "/path/to/mine"
"""Where docs/extending.md's commands find its example files (written out by `examples_dir`)."""


def bash_lines(path: Path) -> list[str]:
    """The command lines of the ```bash blocks of one file, continuations joined."""
    lines, block, pending = [], None, ""
    for raw in path.read_text().splitlines():
        fence = FENCE.match(raw.strip())
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block != "bash":
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return lines


def commands(line: str) -> list[list[str]]:
    """The `python -m sa_bench...` commands of a shell line (split at && ; |, env assignments
    before the command dropped), as argument lists without `python -m`."""
    tokens = shlex.split(line, comments=True)
    out, current = [], []
    for token in [*tokens, "&&"]:
        if token in ("&&", ";", "|", "||"):
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)
            if current[:2] == ["python", "-m"] and current[2:3] and current[2].split(".")[0] == "sa_bench":
                out.append(current[2:])
            current = []
        else:
            current.append(token)
    return out


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in bash_lines(path):
            for cmd in commands(line):
                found.append((f"{path.relative_to(ROOT)}: {' '.join(cmd)}", cmd))
    return found


DOCUMENTED = documented()
SWEEPS = [(name, cmd) for name, cmd in DOCUMENTED if cmd[0] == "sa_bench"]
MODULES = [(name, cmd) for name, cmd in DOCUMENTED if cmd[0] != "sa_bench"]


def test_the_docs_show_commands():
    assert len(SWEEPS) >= 15 and len(MODULES) >= 10, (len(SWEEPS), len(MODULES))
    shown = {cmd[0] for _, cmd in MODULES}
    assert {"sa_bench.report", "sa_bench.migrate", "sa_bench.tracking", "sa_bench.perf.resume",
            "sa_bench.launch.key_defaults"} <= shown


@functools.cache
def examples_dir() -> Path:
    """docs/extending.md's example files, written where its commands look: each ```python or
    ```yaml block whose first line is `# <path>` starts that file; a python block without one
    continues the last python file."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sa_bench-docs-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    files: dict[str, list[str]] = {}
    last_py, block, current = None, None, None
    for raw in (ROOT / "docs" / "extending.md").read_text().splitlines():
        fence = FENCE.match(raw.strip())
        if fence:
            block = None if block is not None else fence.group(1)
            current = None
            continue
        if block not in ("python", "yaml"):
            continue
        if current is None:
            named = re.fullmatch(r"# ([\w/.-]+\.(py|yaml))", raw.strip())
            current = named.group(1) if named else last_py
            if block == "python":
                last_py = current
            files.setdefault(current, [])
        files[current].append(raw)
    for rel, lines in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n")
    return root


def test_extending_examples_build():
    """The classes of docs/extending.md import and validate with their YAML's values."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = examples_dir()
    assert {p.name for p in root.rglob("*.yaml")} >= {"my_topk.yaml", "my_press.yaml",
                                                      "my_prefill.yaml", "colour.yaml"}
    sys.path.insert(0, str(root))
    try:
        built = []
        for path in sorted((root / "conf").rglob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(path))
            nodes = [data, *(data.get("maskers") or {}).values()]
            nodes += [data[s] for s in ("compression", "prefill") if data.get(s)]
            for node in nodes:
                if isinstance(node, dict) and "_target_" in node and not node["_target_"].startswith("sa_bench."):
                    built.append(instantiate(node, _convert_="all"))
        names = {type(b).__name__ for b in built}
        assert names == {"KeyNormTopK", "ValueNorm", "FirstAndLastBlocks", "Colour"}, names
        colour = next(b for b in built if type(b).__name__ == "Colour")
        colour.subset = "short"
        samples = colour.load(None)
        assert len(samples) == 10 and colour.score(samples, [s.answers[0] for s in samples])["score"] == 100.0
    finally:
        sys.path.remove(str(root))
        for name in ("my_methods", "my_bench"):
            sys.modules.pop(name, None)


# --- python -m sa_bench: Hydra overrides --------------------------------------------------------


def _text(override: Override, value: str) -> str:
    return f"{override.get_key_element()}={value}"


def _values(override: Override) -> list[str]:
    """The values a sweep override takes, as override strings (one for a plain override)."""
    if not override.is_sweep_override():
        return [override.input_line]
    return [_text(override, v) for v in override.sweep_string_iterator()]


@functools.cache
def _launcher_composes(choice: str) -> bool:
    """Whether `hydra/launcher=choice` composes here (its plugin installed: the Ray launcher
    lives in its own environment)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            compose(config_name="config", overrides=[f"hydra/launcher={choice}"], return_hydra_config=True)
        except Exception:  # noqa: BLE001 - a missing plugin's config
            return False
    return True


@functools.cache
def _compose(overrides: tuple[str, ...]) -> str | None:
    """None when these overrides compose, else Hydra's message."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 - any composition error is the failure
            return f"{type(exc).__name__}: {exc}"
    return None


def compositions(args: list[str]) -> list[tuple[str, ...]]:
    """The override lists Hydra composes for this command line: the multirun base (non-swept
    overrides only), then each combination of swept group choices with every other sweep at
    its first value."""
    texts = [a.replace(MINE, str(examples_dir())) for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(texts)
    launcher = [o for o in parsed if o.get_key_element() == "hydra/launcher"]
    for o in launcher:
        for choice in o.sweep_string_iterator() if o.is_sweep_override() else [o.value()]:
            assert (CONF_DIR / "hydra" / "launcher" / f"{choice}.yaml").is_file(), choice
            if not _launcher_composes(choice):  # its plugin's keys cannot be checked here
                parsed = [p for p in parsed if p.get_key_element() != "hydra/launcher"
                          and not p.get_key_element().startswith("hydra.launcher.")]
    base = tuple(o.input_line for o in parsed if not o.is_sweep_override())
    runs: list[tuple[str, ...]] = [()]
    for o in parsed:
        group = o.get_key_element().lstrip("+~") in GROUPS
        values = _values(o) if group else _values(o)[:1]
        runs = [run + (v,) for run in runs for v in values]
    return [base, *runs]


@pytest.mark.parametrize("args", [cmd[1:] for _, cmd in SWEEPS],
                         ids=[name for name, _ in SWEEPS])
def test_sweep_command_composes(args):
    if any(PLACEHOLDER.search(a) for a in args):
        pytest.skip("placeholder in the command")
    for overrides in compositions(args):
        error = _compose(overrides)
        assert error is None, f"{list(overrides)}: {error}"


def test_a_missing_key_or_choice_fails():
    """The check above can fail: a misspelled key, a config that does not exist, a key only one
    config has set in the multirun base without `++`."""
    bad = [["sparse=oracle_topk", "sparse.maskers.topk.heavy=0.1"], ["sparse=oracle_topp"],
           ["-m", "sparse=nope"], ["-m", "sparse=snapkv,adakv", "sparse.compression.query_aware=true"]]
    results = [any(_compose(o) for o in compositions(args)) for args in bad]
    assert results == [True, False, True, True]


# --- python -m sa_bench.<module> -------------------------------------------------------------


def _help(module: str) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" from runpy
            with pytest.raises(SystemExit) as exit_info:
                runpy.run_module(module, run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None), f"{module} --help exited {exit_info.value.code}"
    return out.getvalue()


@functools.cache
def module_help(module: str) -> str:
    return _help(module)


@pytest.mark.parametrize("cmd", [cmd for _, cmd in MODULES], ids=[name for name, _ in MODULES])
def test_module_command_exists(cmd):
    module, args = cmd[0], cmd[1:]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    text = module_help(module)
    assert "usage:" in text
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", text), f"{module} has no {option}"
