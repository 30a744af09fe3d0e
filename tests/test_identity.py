import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from sa_bench.attention import maskers
from sa_bench.launch import identity, jobdir
from sa_bench.launch.identity import (
    data_fingerprint,
    job_key,
    job_relpath,
    legacy_key,
    migrate_legacy,
    sanitize,
)
from sa_bench.models import loading
from sa_bench.models.identity import weights_identity
from sa_bench.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "data" / "legacy_v1"

CFG = {
    "model": {"name": "tiny", "pretrained": "embedded:tiny-retrieval", "dtype": "float32",
              "max_context": 8192},
    "sparse": {"name": "streaming", "phase": "question", "maskers": {
        "sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": 4},
        "local": {"_target_": "sa_bench.attention.maskers.Local", "size": 64}}},
    "benchmark": {"_target_": "sa_bench.benchmarks.passkey.Passkey", "name": "passkey",
                  "subsets": ["1k", "2k"], "subset": "1k", "n_samples": 4},
    "seed": 0, "max_new_tokens": None,
    "output_root": "outputs", "overwrite": False, "plan": False, "pool": {"devices": "cpu"},
}


def changed(cfg: dict, key_path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = key_path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def key(cfg: dict) -> str:
    return job_key(JobSpec.from_dict(cfg))


# Stand-ins for a masker class after a refactoring (defined here: another module path).
@dataclasses.dataclass
class Local(maskers.Local):
    """The same class moved to another module."""


@dataclasses.dataclass
class LocalNewOption(maskers.Local):
    """Local with a new option whose default keeps the old behaviour."""

    key_name = "Local"
    stride: int = 1


@dataclasses.dataclass
class LocalNewDefault(maskers.Local):
    """Local whose code default changed (64 -> 128)."""

    key_name = "Local"
    size: int = 128


def with_local(cls: type, **fields) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["sparse"]["maskers"]["local"] = {"_target_": f"{__name__}.{cls.__name__}", **fields}
    return cfg


def test_key_stable_under_a_class_move():
    assert key(with_local(Local, size=64)) == key(CFG)


def test_key_stable_under_a_new_option_with_a_recorded_default(monkeypatch):
    recorded = copy.deepcopy(identity.recorded_defaults())
    recorded["Local"]["stride"] = 1  # what `python -m sa_bench.launch.identity --record` adds
    monkeypatch.setattr(identity, "recorded_defaults", lambda: recorded)
    assert key(with_local(LocalNewOption, size=64)) == key(CFG)
    assert key(with_local(LocalNewOption, size=64, stride=2)) != key(CFG)


def test_unrecorded_new_option_is_reported_until_recorded(monkeypatch):
    monkeypatch.setattr(identity, "config_classes", lambda: [LocalNewOption, maskers.Sink])
    assert identity.missing_records() == {"Local": {"stride": 1}}


def test_every_config_field_default_is_recorded():
    assert identity.missing_records() == {}, "run: python -m sa_bench.launch.identity --record"


def test_key_changed_by_a_code_default():
    # the YAML does not set `size`: the value comes from the class default only
    assert key(with_local(LocalNewDefault)) != key(with_local(Local))
    assert key(with_local(Local)) == key(CFG)  # the recorded default (64) is the YAML's value


@pytest.mark.parametrize("key_path, value", [
    ("seed", 1), ("max_new_tokens", 8), ("model.max_context", 4096), ("model.dtype", "bfloat16"),
    ("model.name", "tiny2"), ("model.chat_template", True),
    ("sparse.phase", "decode"), ("sparse.dense_layers", [0]), ("sparse.seed", 1),
    ("sparse.maskers.local.size", 32), ("sparse.maskers.local.size", 0.5),
    ("benchmark.subset", "2k"), ("benchmark.n_samples", 5), ("benchmark.max_samples", 2),
    ("benchmark.seed", 3),
])
def test_each_result_value_changes_the_key(key_path, value):
    assert key(changed(CFG, key_path, value)) != key(CFG)


def test_a_removed_masker_changes_the_key():
    cfg = copy.deepcopy(CFG)
    del cfg["sparse"]["maskers"]["sink"]
    assert key(cfg) != key(CFG)


@pytest.mark.parametrize("key_path, value", [
    ("output_root", "/elsewhere"), ("overwrite", True), ("plan", True),
    ("pool.devices", "auto"), ("pool.jobs_per_device", 2), ("benchmark.data_dir", "/data/x"),
    ("benchmark.subsets", ["1k"]), ("cell", "a/b/c/d/e"),
])
def test_run_settings_do_not_change_the_key(key_path, value):
    assert key(changed(CFG, key_path, value)) == key(CFG)


def test_int_and_float_budgets_differ_and_values_given_equal_defaults_do_not():
    assert key(changed(CFG, "sparse.maskers.local.size", 1)) != key(changed(CFG, "sparse.maskers.local.size", 1.0))
    explicit = changed(CFG, "sparse.dense_layers", [])  # the class default, written out
    assert key(explicit) == key(CFG)


def test_relpath_layout_and_sanitised_names():
    cfg = changed(CFG, "model.name", "Llama-3.1 8B:Instruct")
    rel = job_relpath(JobSpec.from_dict(cfg))
    parts = rel.split("/")
    assert parts[:4] == ["Llama-3.1_8B_Instruct", "streaming", "passkey", "1k"]
    assert parts[4] == key(cfg) and len(parts) == 5


def test_sanitize_refuses_traversal_and_odd_characters():
    for bad in ["..", "../../etc", "a/b", "", ".hidden", "x\x00y", "名前:*?"]:
        out = sanitize(bad)
        assert "/" not in out and out not in ("", ".", "..") and not out.startswith(".")
        assert all(c.isalnum() or c in "._+=-" for c in out)


# --- weights ---------------------------------------------------------------------------------

def local_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(loading.embedded_dir("tiny-retrieval"), dest)
    return dest


def test_key_changed_by_the_weights_not_by_their_mtime(tmp_path):
    model = local_copy(tmp_path)
    cfg = changed(CFG, "model.pretrained", str(model))
    before = key(cfg)
    os.utime(model / "model.safetensors", (1, 1))  # touched, same bytes
    assert key(cfg) == before
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (model / "model.safetensors").write_bytes(bytes(data))
    assert key(cfg) != before


def test_files_beside_the_model_that_are_not_the_model_keep_the_key(tmp_path):
    model = local_copy(tmp_path)
    cfg = changed(CFG, "model.pretrained", str(model))
    before = key(cfg)
    (model / "hashattn.safetensors").write_bytes(b"a sparse method's own weights")
    (model / "training.json").write_text("{}")
    assert key(cfg) == before
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text().replace('"', "'", 1))
    assert key(cfg) != before


def test_embedded_and_a_copy_elsewhere_share_the_weights_part(tmp_path):
    model = local_copy(tmp_path)
    embedded = weights_identity(JobSpec.from_dict(CFG).model)
    local = weights_identity(JobSpec.from_dict(changed(CFG, "model.pretrained", str(model))).model)
    assert embedded.split(":")[-1] == local.split(":")[-1]


def test_hub_weights_and_the_offline_fallback_differ(tmp_path, monkeypatch):
    fallback = local_copy(tmp_path)
    monkeypatch.setitem(loading.OFFLINE_FALLBACKS, "smollm2-135m-instruct-gguf", lambda: str(fallback))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    cfg = changed(CFG, "model", {"name": "smollm2-135m", "pretrained": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                 "offline_fallback": "smollm2-135m-instruct-gguf"})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub = key(cfg)
    assert weights_identity(JobSpec.from_dict(cfg).model) == "hub:HuggingFaceTB/SmolLM2-135M-Instruct@main"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_identity(JobSpec.from_dict(cfg).model).startswith("fallback:")
    assert key(cfg) != hub
    # with the hub copy in the cache, offline loads it: hub identity again
    refs = tmp_path / "hub-cache" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0" * 40)
    assert key(cfg) == hub
    assert key(changed(cfg, "model.revision", "v2")) != hub


# --- benchmark data ---------------------------------------------------------------------------

def test_data_fingerprint_follows_file_content_not_mtime(tmp_path):
    bench = JobSpec.from_dict(changed(CFG, "benchmark.data_dir", str(tmp_path))).benchmark
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n')
    first = data_fingerprint(bench)
    os.utime(tmp_path / "a.jsonl", (1, 1))
    assert data_fingerprint(bench) == first
    (tmp_path / "a.jsonl").write_text('{"x": 2}\n')
    assert data_fingerprint(bench) != first
    assert data_fingerprint(JobSpec.from_dict(CFG).benchmark) is None  # generated data


# --- result trees of the first key scheme -----------------------------------------------------

def test_legacy_tree_is_rekeyed_and_found_done(tmp_path):
    tree = tmp_path / "out"
    shutil.copytree(LEGACY, tree)
    legacy_dirs = sorted(p.parent for p in tree.rglob(jobdir.MARKER))
    assert len(legacy_dirs) == 4
    for old in legacy_dirs:
        cfg = identity._read_yaml(old / jobdir.CONFIG)
        assert jobdir.read_json(old / jobdir.MARKER)["key"] == legacy_key(cfg) == old.name
        new_key = key(cfg)
        new = old.parent / new_key
        assert new_key != old.name
        assert migrate_legacy(new, new_key)
        assert not old.exists() and jobdir.is_done(new, new_key)
        assert jobdir.read_json(new / jobdir.MARKER)["migrated_from"] == old.name
        assert not migrate_legacy(new, new_key)  # nothing left to move


def test_legacy_cell_keyed_with_its_subsets_list_is_rekeyed_too(tmp_path):
    """Trees written before benchmark.subsets left the first scheme's key."""
    tree = tmp_path / "out"
    shutil.copytree(LEGACY, tree)
    old = next(p.parent for p in tree.rglob(jobdir.MARKER))
    cfg = identity._read_yaml(old / jobdir.CONFIG)
    older = old.parent / legacy_key(cfg, with_subsets=True)
    assert older.name != old.name
    old.rename(older)
    marker = jobdir.read_json(older / jobdir.MARKER)
    jobdir.write_json_atomic(older / jobdir.MARKER, {**marker, "key": older.name})
    assert migrate_legacy(older.parent / key(cfg), key(cfg))
    assert jobdir.is_done(older.parent / key(cfg), key(cfg))


def test_legacy_cell_of_another_config_is_not_taken(tmp_path):
    tree = tmp_path / "out"
    shutil.copytree(LEGACY, tree)
    old = next(p.parent for p in tree.rglob(jobdir.MARKER))
    cfg = changed(identity._read_yaml(old / jobdir.CONFIG), "seed", 7)
    new_key = key(cfg)
    assert not migrate_legacy(old.parent / new_key, new_key)
    assert old.exists()


def test_legacy_tree_found_done_by_the_command_that_wrote_it(tmp_path, sa_bench_cli):
    tree = tmp_path / "out"
    shutil.copytree(LEGACY, tree)
    proc = sa_bench_cli("sparse=dense,streaming", "benchmark.n_samples=2", "plan=true",
                        root=tree, check=True)
    assert "4 jobs: 4 done (skipped), 0 to run" in proc.stdout, proc.stdout + proc.stderr
    assert "4 finished cells re-keyed" in proc.stdout


# --- the job checks the identity it is handed; changed data is rerun --------------------------

def test_job_refuses_a_cell_computed_differently(tmp_path, sa_bench_cli):
    out = tmp_path / "out"
    wrong = "tiny/dense/passkey/1k/000000000000"
    proc = sa_bench_cli("hydra.mode=RUN", "benchmark.subset=1k", f"++cell={wrong}", root=out)
    assert proc.returncode != 0
    error = (out / wrong / jobdir.ERROR).read_text()
    assert "IdentityMismatch" in error and "the job computes tiny/dense/passkey/1k/" in error
    assert not (out / wrong / jobdir.PREDICTIONS).exists()  # refused before any work


def test_finished_cell_whose_data_changed_is_rerun(tmp_path, sa_bench_cli):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "tests" / "fixtures" / "longbench", data)
    args = ["benchmark=longbench", "benchmark.subsets=[hotpotqa]", "benchmark.max_samples=1",
            "max_new_tokens=2", f"benchmark.data_dir={data}"]
    out = tmp_path / "out"
    first = sa_bench_cli(*args, root=out, check=True)
    assert "1 jobs: 0 done (skipped), 1 to run" in first.stdout
    (cell,) = [p.parent for p in out.rglob(jobdir.MARKER)]
    recorded = jobdir.read_json(cell / jobdir.MARKER)["summary"]["data"]
    assert sa_bench_cli(*args, root=out, check=True).stdout.startswith("1 jobs: 1 done")
    rows = (data / "hotpotqa.jsonl").read_text().splitlines()
    (data / "hotpotqa.jsonl").write_text("\n".join(reversed(rows)) + "\n")  # other samples
    again = sa_bench_cli(*args, root=out, check=True)
    assert ("1 jobs: 0 done (skipped), 1 to run (1 of them finished, but their benchmark "
            "data files changed since)") in again.stdout
    assert jobdir.read_json(cell / jobdir.MARKER)["summary"]["data"] != recorded
    assert sa_bench_cli(*args, root=out, check=True).stdout.startswith("1 jobs: 1 done")
    # files the cell does not read change or appear: nothing reruns (fast path and Hydra path)
    (data / "trec.jsonl").write_text((data / "trec.jsonl").read_text()[::-1])
    (data / "qasper.jsonl").write_text((data / "hotpotqa.jsonl").read_text())
    assert sa_bench_cli(*args, root=out, check=True).stdout.startswith("1 jobs: 1 done")
    assert sa_bench_cli(*args, "plan=true", root=out, check=True).stdout.startswith("1 jobs: 1 done")


def test_a_cell_covers_only_its_own_files_in_data_dir(tmp_path):
    """A LongBench cell's fingerprint covers its subset's file; a fingerprint recorded before
    (every file in data_dir) still matches while that folder is unchanged."""
    shutil.copytree(ROOT / "tests" / "fixtures" / "longbench", tmp_path / "data")
    data = tmp_path / "data"
    cfg = changed(changed(changed(CFG, "benchmark", {
        "_target_": "sa_bench.benchmarks.longbench.LongBench", "name": "longbench",
        "subsets": ["hotpotqa", "trec"]}), "benchmark.subset", "hotpotqa"),
        "benchmark.data_dir", str(data))
    bench = JobSpec.from_dict(cfg).benchmark
    source = identity.data_source(bench)
    assert source == [None, str(data), [str(data / "hotpotqa.jsonl")]]
    own = data_fingerprint(bench)
    folder = identity.local_data_fingerprint(None, str(data))  # the scheme before
    assert own != folder
    cell = tmp_path / "cell"
    cell.mkdir()
    jobdir.write_json_atomic(cell / jobdir.MARKER, {"summary": {"data": folder}})
    assert not identity.data_changed(cell, own, source)  # finished before: not rerun
    (data / "trec.jsonl").write_text("changed\n")
    assert data_fingerprint(bench) == own
    assert identity.data_changed(cell, own, source)  # the old record cannot tell which file
    jobdir.write_json_atomic(cell / jobdir.MARKER, {"summary": {"data": own}})
    assert not identity.data_changed(cell, own, source)
    (data / "hotpotqa.jsonl").write_text((data / "hotpotqa.jsonl").read_text() + "\n")
    assert identity.data_changed(cell, data_fingerprint(bench), source)


def test_interrupted_cell_whose_data_changed_starts_over(tmp_path, sa_bench_cli):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "tests" / "fixtures" / "longbench", data)
    args = ["benchmark=longbench", "benchmark.subsets=[hotpotqa]", "max_new_tokens=2",
            f"benchmark.data_dir={data}"]
    out = tmp_path / "out"
    sa_bench_cli(*args, root=out, check=True)
    (cell,) = [p.parent for p in out.rglob(jobdir.MARKER)]
    before = {r["id"]: r for r in map(json.loads, (cell / jobdir.PREDICTIONS).read_text().splitlines())}
    (cell / jobdir.MARKER).unlink()  # as if killed after its last prediction
    rows = [json.loads(x) for x in (data / "hotpotqa.jsonl").read_text().splitlines()]
    for row in rows:  # same ids, other contexts
        row["context"] += "\nPassage 3:\nAn extra passage that makes every prompt longer."
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sa_bench_cli(*args, root=out, check=True)
    after = {r["id"]: r for r in map(json.loads, (cell / jobdir.PREDICTIONS).read_text().splitlines())}
    assert after.keys() == before.keys()
    assert all(after[i]["prompt_tokens"] > before[i]["prompt_tokens"] for i in after)


def test_a_methods_resolved_weights_file_is_in_the_key(tmp_path):
    """hashattn `weights: auto` resolves to the file next to the model: its content counts."""
    model = local_copy(tmp_path)
    assert (model / "hashattn.safetensors").is_file()
    cfg = changed(CFG, "model.pretrained", str(model))
    cfg["sparse"]["maskers"]["hash"] = {"_target_": "sa_bench.attention.maskers.HashAttention",
                                        "heavy_size": 0.1, "weights": "auto", "model": str(model)}
    before = key(cfg)
    dense_before = key(changed(CFG, "model.pretrained", str(model)))
    data = bytearray((model / "hashattn.safetensors").read_bytes())
    data[-1] ^= 1
    (model / "hashattn.safetensors").write_bytes(bytes(data))
    assert key(cfg) != before
    assert key(changed(CFG, "model.pretrained", str(model))) == dense_before


def test_legacy_config_without_a_field_now_in_the_key_is_not_this_cell():
    """A legacy LooGLE cell ran without the repetition penalty its config did not name: it is
    not migrated to the key of today's LooGLE cell (penalty 2.0); a legacy passkey cell,
    whose missing fields all take their recorded defaults, is."""
    import yaml

    from sa_bench.launch.identity import filled_by_code, identity_values
    from sa_bench.spec import JobSpec

    cfg = yaml.safe_load((LEGACY / "tiny/dense/passkey/1k/f1627d3a8373/config.yaml").read_text())
    assert filled_by_code(identity_values(JobSpec.from_dict(cfg)), cfg) == []
    old = copy.deepcopy(cfg)
    old["benchmark"] = yaml.safe_load((ROOT / "conf/benchmark/loogle.yaml").read_text())
    old["benchmark"].pop("generation")
    old["benchmark"]["subset"] = "shortdep_qa"
    assert filled_by_code(identity_values(JobSpec.from_dict(old)), old) == ["benchmark.generation"]


def test_key_version_marks_classes_whose_results_changed_meaning():
    from sa_bench.attention.maskers import RandomSampling, Sink
    from sa_bench.launch.identity import canonical

    assert canonical(RandomSampling())["@v"] == 2
    assert "@v" not in canonical(Sink())
