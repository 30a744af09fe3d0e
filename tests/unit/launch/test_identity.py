import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sa_bench.attention import maskers
from sa_bench.fingerprint import FingerprintCache, data_fingerprint
from sa_bench.launch import identity, jobdir, key_defaults
from sa_bench.launch.identity import Inputs, job_key, job_relpath, sanitize
from sa_bench.models import loading
from sa_bench.models.identity import weights_identity
from sa_bench.spec import JobSpec
from tests.conftest import DATA, FIXTURES, ROOT

LEGACY = DATA / "legacy_v1"

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


def inputs(device: str = "cpu", offline: bool = False) -> Inputs:
    return Inputs(device, offline, FingerprintCache())


def key(cfg: dict, **kw) -> str:
    return job_key(JobSpec.from_dict(cfg), inputs(**kw))


def weights(cfg: dict, offline: bool = False) -> str:
    return weights_identity(JobSpec.from_dict(cfg).model, offline, FingerprintCache())


# Stand-ins for a masker class after a refactoring inside the package (their module is set to
# one of the package's: only classes of sa_bench keep their keys by name).
@dataclasses.dataclass
class Local(maskers.Local):
    """The same class moved to another module of the package."""


Local.__module__ = "sa_bench.attention.moved"


@dataclasses.dataclass
class LocalNewOption(maskers.Local):
    """Local with a new option whose default keeps the old behaviour."""

    key_name = "Local"
    stride: int = 1


LocalNewOption.__module__ = "sa_bench.attention.moved"


@dataclasses.dataclass
class LocalNewDefault(maskers.Local):
    """Local whose code default changed (64 -> 128)."""

    key_name = "Local"
    size: int = 128


LocalNewDefault.__module__ = "sa_bench.attention.moved"


@dataclasses.dataclass
class OracleTopK(maskers.OracleTopK):
    """A user's patched copy of the stock class, in the user's own module."""


def with_local(cls: type, **fields) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["sparse"]["maskers"]["local"] = {"_target_": f"{__name__}.{cls.__name__}", **fields}
    return cfg


def with_topk(target: str) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["sparse"]["maskers"]["topk"] = {"_target_": target, "heavy_size": 0.1}
    return cfg


def test_key_stable_under_a_class_move():
    assert key(with_local(Local, size=64)) == key(CFG)


def test_key_stable_under_a_new_option_with_a_recorded_default(monkeypatch):
    recorded = copy.deepcopy(identity.recorded_defaults())
    recorded["Local"]["stride"] = 1  # what `python -m sa_bench.launch.key_defaults --record` adds
    monkeypatch.setattr(identity, "recorded_defaults", lambda: recorded)
    monkeypatch.setattr(key_defaults.identity, "recorded_defaults", lambda: recorded)
    assert key(with_local(LocalNewOption, size=64)) == key(CFG)
    assert key(with_local(LocalNewOption, size=64, stride=2)) != key(CFG)


def test_unrecorded_new_option_is_reported_until_recorded():
    assert key_defaults.missing_records([LocalNewOption, maskers.Sink]) == {"Local": {"stride": 1}}


def test_every_config_field_default_is_recorded():
    assert key_defaults.missing_records() == {}, "run: python -m sa_bench.launch.key_defaults --record"


def test_a_class_outside_the_package_is_keyed_by_module_and_name():
    """A patched copy of a stock masker in the user's own module is another method."""
    stock = key(with_topk("sa_bench.attention.maskers.OracleTopK"))
    assert key(with_topk(f"{__name__}.OracleTopK")) != stock
    values = identity.identity_values(JobSpec.from_dict(with_topk(f"{__name__}.OracleTopK")), inputs())
    topk = dict(values["sparse"]["maskers"])["topk"]
    assert topk["@"] == f"{__name__}.OracleTopK"
    # no recorded defaults for a user's class: every field is spelled out
    assert set(topk) - {"@"} == {f.name for f in dataclasses.fields(OracleTopK) if f.init}


def test_masker_order_is_in_the_key():
    cfg = copy.deepcopy(CFG)
    sink = cfg["sparse"]["maskers"].pop("sink")
    cfg["sparse"]["maskers"]["sink"] = sink  # local first, then sink
    assert list(cfg["sparse"]["maskers"]) == ["local", "sink"]
    assert key(cfg) != key(CFG)


def test_resolved_dtype_and_kernel_are_in_the_key(tmp_path):
    model = local_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    auto = changed(changed(changed(CFG, "model.dtype", "auto"), "model.attn_implementation", "auto"),
                   "model.pretrained", str(model))
    assert key(auto) == key(changed(auto, "model.dtype", "float32"))  # CPU: auto is float32
    assert key(auto) == key(changed(auto, "model.attn_implementation", "sdpa"))
    assert key(auto, device="cuda") != key(auto)  # the checkpoint's dtype on a GPU
    assert key(auto, device="cuda") == key(changed(auto, "model.dtype", "bfloat16"), device="cuda")
    assert key(changed(auto, "model.attn_implementation", "eager")) != key(auto)
    values = identity.identity_values(JobSpec.from_dict(auto), inputs())
    assert (values["model"]["dtype"], values["model"]["attn_implementation"]) == ("float32", "sdpa")


@pytest.mark.parametrize("key_path, first, second", [
    ("max_new_tokens", None, 12),  # passkey's official generation length
    ("model.pretrained", "embedded:tiny-retrieval", "embedded:tiny_retrieval"),
    ("benchmark.max_samples", None, 4),  # n_samples is 4
    ("benchmark.max_samples", 4, 10),
    ("sparse.dense_layers", [0], [0, 0]),
    ("sparse.dense_layers", [0, 1], [1, 0]),
    ("sparse.seed", 0, 5),  # no masker of streaming draws random numbers
    ("sparse.maskers.sink.size", 0, "drop"),  # a sink of 0 tokens is no sink
])
def test_equivalent_spellings_give_one_key(key_path, first, second):
    one = changed(CFG, key_path, first)
    if second == "drop":
        other = copy.deepcopy(CFG)
        del other["sparse"]["maskers"]["sink"]
    else:
        other = changed(CFG, key_path, second)
    assert key(one) == key(other)


def test_the_embedded_model_and_its_path_give_one_key():
    path = str(loading.embedded_dir("tiny-retrieval"))
    assert key(changed(CFG, "model.pretrained", path)) == key(CFG)


def test_revision_main_is_the_default_revision():
    hub = changed(CFG, "model", {"name": "x", "pretrained": "org/some-model"})
    assert key(changed(hub, "model.revision", "main")) == key(hub)
    assert key(changed(hub, "model.revision", "abc123")) != key(hub)


def test_the_seed_of_a_sampling_method_is_in_its_key():
    cfg = copy.deepcopy(CFG)
    cfg["sparse"]["maskers"]["sample"] = {"_target_": "sa_bench.attention.maskers.RandomSampling",
                                          "rate": 0.1}
    assert key(changed(cfg, "sparse.seed", 5)) != key(cfg)


def test_key_changed_by_a_code_default():
    # the YAML does not set `size`: the value comes from the class default only
    assert key(with_local(LocalNewDefault)) != key(with_local(Local))
    assert key(with_local(Local)) == key(CFG)  # the recorded default (64) is the YAML's value


@pytest.mark.parametrize("key_path, value", [
    ("seed", 1), ("max_new_tokens", 8), ("model.max_context", 4096), ("model.dtype", "bfloat16"),
    ("model.name", "tiny2"), ("model.chat_template", True),
    ("sparse.phase", "decode"), ("sparse.dense_layers", [0]),
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
    ("pool.devices", "auto"), ("pool.jobs_per_device", 2),
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
    rel = job_relpath(JobSpec.from_dict(cfg), inputs())
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
    assert weights(CFG) == weights(changed(CFG, "model.pretrained", str(model)))


def test_hub_weights_and_the_offline_fallback_differ(tmp_path, monkeypatch):
    fallback = local_copy(tmp_path)
    monkeypatch.setitem(loading.OFFLINE_FALLBACKS, "smollm2-135m-instruct-gguf", lambda: str(fallback))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    cfg = changed(CFG, "model", {"name": "smollm2-135m", "pretrained": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                 "offline_fallback": "smollm2-135m-instruct-gguf"})
    hub = key(cfg)
    assert weights(cfg) == "hub:HuggingFaceTB/SmolLM2-135M-Instruct@main"
    assert weights(cfg, offline=True).startswith("fallback:")
    assert key(cfg, offline=True) != hub
    # with the hub copy in the cache, offline loads it: hub identity again
    refs = tmp_path / "hub-cache" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0" * 40)
    assert key(cfg, offline=True) == hub
    assert key(changed(cfg, "model.revision", "v2")) != hub


def test_a_changed_byte_anywhere_in_a_large_weights_file_changes_the_key(tmp_path):
    """Whole files are hashed: two checkpoints differing only in a middle layer differ."""
    model = local_copy(tmp_path)
    big = model / "model.safetensors"
    big.write_bytes(big.read_bytes() + bytes(9 << 20))  # past the old 4 MiB partial-hash limit
    cfg = changed(CFG, "model.pretrained", str(model))
    before = key(cfg)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 1
    big.write_bytes(bytes(data))
    assert key(cfg) != before


def test_file_hashes_are_cached_by_path_size_mtime_and_inode(tmp_path):
    file = tmp_path / "w.bin"
    file.write_bytes(b"a" * 100)
    cache = FingerprintCache.in_root(tmp_path / "out")
    first = cache.content_hash(file)
    cache.save()
    again = FingerprintCache.in_root(tmp_path / "out")
    assert again.hashes == cache.hashes and again.content_hash(file) == first
    assert not again.changed  # answered from the saved cache, the file was not read
    file.write_bytes(b"b" * 100)  # same size, new content and mtime
    assert again.content_hash(file) != first


# --- benchmark data ---------------------------------------------------------------------------

def test_data_fingerprint_follows_file_content_not_mtime(tmp_path):
    shutil.copytree(FIXTURES / "longbench", tmp_path / "data")
    file = tmp_path / "data" / "hotpotqa.jsonl"
    bench = JobSpec.from_dict(longbench_cfg(tmp_path / "data")).benchmark
    first = data_fingerprint(bench, FingerprintCache())
    os.utime(file, (1, 1))
    assert data_fingerprint(bench, FingerprintCache()) == first
    file.write_text(file.read_text() + "\n")
    assert data_fingerprint(bench, FingerprintCache()) != first
    assert data_fingerprint(JobSpec.from_dict(CFG).benchmark, FingerprintCache()) is None  # generated


def longbench_cfg(data: Path) -> dict:
    return changed(changed(changed(CFG, "benchmark", {
        "_target_": "sa_bench.benchmarks.longbench.LongBench", "name": "longbench",
        "subsets": ["hotpotqa", "trec"]}), "benchmark.subset", "hotpotqa"),
        "benchmark.data_dir", str(data))


# --- the job checks the identity it is handed; changed data is rerun --------------------------

@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_job_refuses_a_cell_computed_differently(tmp_path, sa_bench_cli):
    out = tmp_path / "out"
    wrong = "tiny/dense/passkey/1k/000000000000"
    proc = sa_bench_cli("hydra.mode=RUN", "benchmark.subset=1k", f"++cell={wrong}", root=out)
    assert proc.returncode != 0
    error = (out / wrong / jobdir.ERROR).read_text()
    assert "IdentityMismatch" in error and "the job computes tiny/dense/passkey/1k/" in error
    assert not (out / wrong / jobdir.PREDICTIONS).exists()  # refused before any work


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_two_data_sets_are_two_cells_and_both_are_kept(tmp_path, sa_bench_cli):
    """Alternating two data folders with the same file names keeps both results."""
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURES / "longbench", first)
    shutil.copytree(first, second)
    rows = (second / "hotpotqa.jsonl").read_text().splitlines()
    (second / "hotpotqa.jsonl").write_text("\n".join(reversed(rows)) + "\n")  # other order
    args = ["benchmark=longbench", "benchmark.subsets=[hotpotqa]", "benchmark.max_samples=1",
            "max_new_tokens=2"]
    out = tmp_path / "out"
    for data in (first, second):
        proc = sa_bench_cli(*args, f"benchmark.data_dir={data}", root=out, check=True)
        assert "1 jobs: 0 done (skipped), 1 to run" in proc.stdout
    cells = sorted(p.parent for p in out.rglob(jobdir.MARKER))
    assert len(cells) == 2 and cells[0].parent == cells[1].parent  # one subset, two keys
    for data in (first, second):
        proc = sa_bench_cli(*args, f"benchmark.data_dir={data}", root=out, check=True)
        assert proc.stdout.startswith("1 jobs: 1 done (skipped)"), proc.stdout
    # files the cell does not read change or appear: the cell stays done
    (first / "trec.jsonl").write_text((first / "trec.jsonl").read_text()[::-1])
    (first / "qasper.jsonl").write_text((first / "hotpotqa.jsonl").read_text())
    proc = sa_bench_cli(*args, f"benchmark.data_dir={first}", root=out, check=True)
    assert proc.stdout.startswith("1 jobs: 1 done (skipped)"), proc.stdout


def test_the_file_a_loader_reads_decides_the_data_identity(tmp_path):
    """`hotpotqa.jsonl` added beside `hotpotqa.json`: the loader reads the other file now."""
    data = tmp_path / "data"
    data.mkdir()
    rows = (FIXTURES / "longbench" / "hotpotqa.jsonl").read_text()
    (data / "hotpotqa.json").write_text("[" + ",".join(rows.splitlines()) + "]")
    before = key(longbench_cfg(data))
    (data / "trec.jsonl").write_text("{}\n")  # another subset's file: not read
    assert key(longbench_cfg(data)) == before
    (data / "hotpotqa.jsonl").write_text(rows)  # same rows, but the loader now reads this file
    assert key(longbench_cfg(data)) != before


def test_a_methods_resolved_weights_file_is_in_the_key(tmp_path):
    """hashattn `weights: auto` resolves to the file next to the model: its content counts."""
    model = local_copy(tmp_path)
    assert (model / "hashattn.safetensors").is_file()
    cfg = changed(CFG, "model.pretrained", str(model))
    cfg["sparse"]["maskers"]["hash"] = {"_target_": "sa_bench.attention.hashattn.HashAttention",
                                        "heavy_size": 0.1, "weights": "auto", "model": str(model)}
    before = key(cfg)
    dense_before = key(changed(CFG, "model.pretrained", str(model)))
    data = bytearray((model / "hashattn.safetensors").read_bytes())
    data[-1] ^= 1
    (model / "hashattn.safetensors").write_bytes(bytes(data))
    assert key(cfg) != before
    assert key(changed(CFG, "model.pretrained", str(model))) == dense_before


def test_a_weights_file_named_auto_or_by_its_path_gives_one_key():
    """hashattn `weights: auto` and the same file given by path read the same bytes."""
    file = loading.embedded_dir("tiny-retrieval") / "hashattn.safetensors"

    def hashed(weights: str, model: str) -> dict:
        cfg = copy.deepcopy(CFG)
        cfg["sparse"]["maskers"]["hash"] = {"_target_": "sa_bench.attention.hashattn.HashAttention",
                                            "heavy_size": 0.1, "weights": weights, "model": model}
        return cfg

    auto = key(hashed("auto", "embedded:tiny-retrieval"))
    assert key(hashed(str(file), "embedded:tiny-retrieval")) == auto
    assert key(hashed(str(file), str(file.parent))) == auto
    assert key(changed(hashed("auto", "embedded:tiny-retrieval"), "sparse.maskers.hash.heavy_size", 0.2)) != auto


# --- issue 23's reuse cases through the command line (plans: nothing runs) ------------------

def planned(sa_bench_cli, out: Path, *args: str, env: dict | None = None) -> list[str]:
    proc = sa_bench_cli(*args, "plan=true", root=out, env=env, check=True)
    return [line.split()[1] for line in proc.stdout.splitlines()[1:] if line.strip().startswith("pending")]


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_masker_order_gives_another_directory(tmp_path, sa_bench_cli):
    out = tmp_path / "out"
    stock = planned(sa_bench_cli, out, "sparse=oracle_topk", "benchmark.subsets=[1k]")
    moved = planned(sa_bench_cli, out, "sparse=oracle_topk", "benchmark.subsets=[1k]",
                    "~sparse.maskers.sink", "+sparse.maskers.sink={_target_:sa_bench.attention.maskers.Sink,size:4}")
    assert len(stock) == len(moved) == 1 and stock != moved


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_a_patched_copy_of_a_stock_class_gives_another_directory(tmp_path, sa_bench_cli):
    user = tmp_path / "user"
    user.mkdir()
    (user / "mymask.py").write_text("from sa_bench.attention.maskers import OracleTopK  # noqa: F401\n")
    out = tmp_path / "out"
    env = {"PYTHONPATH": f"{ROOT}:{user}"}
    stock = planned(sa_bench_cli, out, "sparse=oracle_topk", "benchmark.subsets=[1k]", env=env)
    same_class = planned(sa_bench_cli, out, "sparse=oracle_topk", "benchmark.subsets=[1k]",
                         "sparse.maskers.topk._target_=mymask.OracleTopK", env=env)
    assert same_class == stock  # mymask only re-exports the stock class: the same method
    (user / "mymask.py").write_text(
        "from dataclasses import dataclass\nfrom sa_bench.attention import maskers\n\n"
        "@dataclass\nclass OracleTopK(maskers.OracleTopK):\n    pass\n")
    patched = planned(sa_bench_cli, out, "sparse=oracle_topk", "benchmark.subsets=[1k]",
                      "sparse.maskers.topk._target_=mymask.OracleTopK", env=env)
    assert patched != stock


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_a_large_data_file_edited_in_the_middle_gives_another_directory(tmp_path, sa_bench_cli):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "longbench", data)
    file = data / "hotpotqa.jsonl"
    rows = file.read_text().splitlines()
    padded = [json.dumps({**json.loads(rows[0]), "pad": "x" * (6 << 20)})] + rows[1:]
    file.write_text("\n".join(padded) + "\n")  # over 5 MB
    args = ["benchmark=longbench", "benchmark.subsets=[hotpotqa]", f"benchmark.data_dir={data}"]
    out = tmp_path / "out"
    before = planned(sa_bench_cli, out, *args)
    text = bytearray(file.read_bytes())
    middle = len(text) // 2
    assert text[middle:middle + 1] == b"x"
    text[middle:middle + 1] = b"y"  # same size, one byte in the middle
    file.write_bytes(bytes(text))
    assert planned(sa_bench_cli, out, *args) != before


def test_a_prefill_patterns_file_is_keyed_by_its_content(tmp_path):
    """vertical_slash `patterns` (MInference best_pattern JSON): its content is in the key, not
    its path; no file keeps the key of a config without the field."""
    def vs(patterns=None):
        cfg = copy.deepcopy(CFG)
        prefill = {"_target_": "sa_bench.attention.prefill_methods.VerticalSlash"}
        if patterns is not None:
            prefill["patterns"] = patterns
        cfg["sparse"] = {**cfg["sparse"], "maskers": {}, "prefill": prefill}
        return cfg

    layers = [{"0": ["vertical_and_slash", 100, 800, 0.9]}] * 2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "p.json", tmp_path / "b" / "p.json"
    a.write_text(json.dumps(layers))
    b.write_text(json.dumps(layers))
    plain = key(vs())
    assert key(vs(None)) == plain
    with_a = key(vs(str(a)))
    assert with_a != plain and key(vs(str(b))) == with_a  # the same content elsewhere
    a.write_text(json.dumps([{"0": ["vertical_and_slash", 100, 900, 0.9]}] * 2))
    assert key(vs(str(a))) != with_a


def test_prefill_methods_with_columns_are_keyed_after_the_flex_columns_fix():
    """The flex kernel (CUDA) counted a column inside a selected block twice until the fix:
    the methods whose patterns carry columns were bumped, so no such cell is skipped."""
    from sa_bench.attention.prefill_methods import BlockSparse, FlexPrefill, VerticalSlash

    for cls in (VerticalSlash, FlexPrefill):
        assert identity.canonical(cls())["@v"] == 2
    assert "@v" not in identity.canonical(BlockSparse())  # blocks only: unchanged


# --- inputs read at run time beside the config (audit) -----------------------------------------

def test_a_sampling_methods_draws_do_not_depend_on_which_gpu_was_leased():
    """The pool may lease any GPU and its id is not in the key: the model's first device draws
    the stream of `sparse.seed` whatever its index (cpu:1 stands in for cuda:1), and a second
    device of a split model another stream."""
    import torch

    cfg = copy.deepcopy(CFG)
    cfg["sparse"]["seed"] = 5
    cfg["sparse"]["maskers"]["sample"] = {"_target_": "sa_bench.attention.maskers.RandomSampling",
                                          "rate": 0.1}

    def draws(*devices: torch.device) -> list[torch.Tensor]:
        method = JobSpec.from_dict(cfg).sparse
        return [torch.rand(8, generator=method.on_device(d)[0]) for d in devices]

    on_first_gpu = draws(torch.device("cpu"))[0]
    assert torch.equal(draws(torch.device("cpu", 1))[0], on_first_gpu)
    first, second = draws(torch.device("cpu", 1), torch.device("cpu", 0))
    assert torch.equal(first, on_first_gpu) and not torch.equal(second, first)


def test_the_benchmark_files_shipped_in_the_package_are_keyed_by_content(tmp_path, monkeypatch):
    """LongBench's official prompts and generation lengths ship in the package (assets/): an
    edited template or length is another cell, the same content (a copy elsewhere) the same."""
    from sa_bench.benchmarks import longbench

    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "longbench", data)
    cfg = longbench_cfg(data)
    stock = key(cfg)
    assets = tmp_path / "assets"
    shutil.copytree(longbench.ASSETS, assets)
    monkeypatch.setattr(longbench, "ASSETS", assets)
    longbench._config.cache_clear()
    monkeypatch.setattr(longbench, "_config", longbench._config.__wrapped__)  # read each time
    assert key(cfg) == stock
    original = (assets / "dataset2prompt.json").read_text()
    prompts = json.loads(original)
    prompts["hotpotqa"] = "Answer briefly. " + prompts["hotpotqa"]
    (assets / "dataset2prompt.json").write_text(json.dumps(prompts))
    bench = JobSpec.from_dict(cfg).benchmark
    assert bench.load(None)[0].context.startswith("Answer briefly. ")  # what the job computes
    assert key(cfg) != stock
    (assets / "dataset2prompt.json").write_text(original)
    assert key(cfg) == stock
    lengths = json.loads((assets / "dataset2maxlen.json").read_text())
    (assets / "dataset2maxlen.json").write_text(json.dumps({**lengths, "hotpotqa": 64}))
    assert JobSpec.from_dict(cfg).benchmark.max_new_tokens() == 64
    assert key(cfg) != stock


def test_every_file_shipped_for_the_benchmarks_is_named_by_the_classes_that_read_it():
    """A data file added to the package (a template, a word list) must be listed in the
    `package_files` of the benchmarks that read it, so its content is in their keys."""
    assets = ROOT / "sa_bench" / "benchmarks" / "assets"
    shipped = {p for p in assets.rglob("*") if p.is_file() and p.name not in ("LICENSE", "README.md")}
    named = {p for cls in key_defaults.config_classes() if hasattr(cls, "package_files")
             for p in cls.package_files()}
    assert shipped and shipped == named


def test_every_file_the_tokenizer_reads_and_a_trusted_models_code_are_in_the_weights_part(tmp_path):
    """transformers also reads `added_tokens.json` (more tokens) and
    `additional_chat_templates/*.jinja` (`default.jinja` is the chat template); with
    `trust_remote_code` the model's own `*.py` is the model's computation."""
    model = local_copy(tmp_path)
    cfg = changed(CFG, "model.pretrained", str(model))
    before = key(cfg)
    tokenizer = loading.load_tokenizer(JobSpec.from_dict(cfg).model)
    (model / "added_tokens.json").write_text(json.dumps({"zzz": len(tokenizer)}))
    assert loading.load_tokenizer(JobSpec.from_dict(cfg).model)("zzz").input_ids[-1] == len(tokenizer)
    assert key(cfg) != before
    (model / "added_tokens.json").unlink()
    assert key(cfg) == before
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "default.jinja").write_text("{{ messages[0]['content'] }}")
    assert loading.load_tokenizer(JobSpec.from_dict(cfg).model).chat_template is not None
    assert key(cfg) != before
    shutil.rmtree(model / "additional_chat_templates")
    (model / "modeling_tiny.py").write_text("# the model's own code\n")
    assert key(cfg) == before  # not read without trust_remote_code
    trusted = changed(cfg, "model.trust_remote_code", True)
    with_code = key(trusted)
    (model / "modeling_tiny.py").write_text("# the model's own code, changed\n")
    assert key(trusted) != with_code


def test_the_kernel_in_the_key_is_the_kernel_the_job_runs(tmp_path, monkeypatch):
    """`auto` on a GPU with half weights is flash-attention 2 where flash_attn is installed.
    An installed flash_attn that does not import (built for another torch) is keyed as flash
    by the torch-free sweeper: the job must not run SDPA under that key; it refuses, naming
    the fix."""
    import sys

    import torch

    from sa_bench.attention.dense import resolve_implementation
    from sa_bench.models.identity import resolved_kernel

    site = tmp_path / "site"
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text("raise ImportError('built for another torch')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    model = JobSpec.from_dict(changed(CFG, "model.dtype", "bfloat16")).model
    assert model.attn_implementation == "auto"
    assert resolved_kernel(model, "cuda", "bfloat16") == "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attn.*cannot be imported.*attn_implementation=sdpa"):
        resolve_implementation("auto", torch.device("cuda"), torch.bfloat16)
    assert resolve_implementation("auto", torch.device("cpu"), torch.float32) == "sdpa"


# --- hub data: benchmark.revision --------------------------------------------------------------

def hub_cell(config: str, subset: str, **fields) -> dict:
    """A cell of `conf/benchmark/<config>.yaml` reading its data from the hub (no data_dir)."""
    bench = yaml.safe_load((ROOT / "conf" / "benchmark" / f"{config}.yaml").read_text())
    return changed(CFG, "benchmark", {**bench, "subset": subset, **fields})


BEFORE_REVISION = {  # the benchmark part of these cells' keys before `revision` existed
    ("longbench", "hotpotqa"): {"@": "LongBench", "name": "longbench", "subset": "hotpotqa"},
    ("loogle", "shortdep_qa"): {"@": "LooGLE", "@v": 2, "name": "loogle", "subset": "shortdep_qa",
                                "generation": {"@": "Generation", "repetition_penalty": 2.0}},
    ("aime24", "all"): {"@": "Aime", "@v": 3, "name": "aime24", "subset": "all"},
    ("ruler", "qa_1"): {"@": "Ruler", "@v": 2, "name": "ruler", "subset": "qa_1"},
}


@pytest.mark.parametrize("config, subset", list(BEFORE_REVISION))
def test_an_unset_hub_data_revision_keeps_the_key(config, subset):
    values = identity.identity_values(JobSpec.from_dict(hub_cell(config, subset)), inputs())
    assert values["benchmark"] == BEFORE_REVISION[config, subset]


def test_the_hub_data_revision_is_in_the_key():
    """Two commits of a benchmark's hub dataset are two cells; `main` is the unset revision."""
    keys = {rev: key(hub_cell("longbench", "hotpotqa", revision=rev))
            for rev in (None, "main", "0123abc", "4567def")}
    assert keys[None] == keys["main"]
    assert len({keys[None], keys["0123abc"], keys["4567def"]}) == 3
    assert key(hub_cell("loogle", "shortdep_qa", revision="0123abc")) != key(
        hub_cell("loogle", "shortdep_qa"))
