import copy

from sa_bench.launch.identity import job_key, job_relpath, sanitize

CFG = {
    "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "pretrained": "x"},
    "sparse": {"name": "oracle_topk", "maskers": {"topk": {"heavy_size": 0.1}}},
    "benchmark": {"name": "longbench", "subset": "hotpotqa", "data_dir": "/data/a"},
    "seed": 0,
    "output_root": "outputs",
    "overwrite": False,
    "plan": False,
    "pool": {"devices": "auto"},
}


def changed(key_path: str, value):
    cfg = copy.deepcopy(CFG)
    *parents, last = key_path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def test_result_values_change_the_key():
    assert job_key(changed("sparse.maskers.topk.heavy_size", 0.2)) != job_key(CFG)
    assert job_key(changed("seed", 1)) != job_key(CFG)
    assert job_key(changed("benchmark.subset", "musique")) != job_key(CFG)


def test_run_settings_do_not_change_the_key():
    for key, value in [("output_root", "/elsewhere"), ("overwrite", True), ("plan", True),
                       ("pool.devices", [0, 1]), ("benchmark.data_dir", "/other/machine"),
                       ("benchmark.subsets", ["hotpotqa"])]:
        assert job_key(changed(key, value)) == job_key(CFG), key


def test_key_ignores_dict_order():
    reordered = dict(reversed(list(CFG.items())))
    assert job_key(reordered) == job_key(CFG)


def test_relpath_layout_and_sanitised_names():
    rel = job_relpath(CFG)
    parts = rel.split("/")
    assert parts[:4] == ["meta-llama_Llama-3.1-8B-Instruct", "oracle_topk", "longbench", "hotpotqa"]
    assert parts[4] == job_key(CFG) and len(parts) == 5


def test_sanitize_refuses_traversal_and_odd_characters():
    for bad in ["..", "../../etc", "a/b", "", ".hidden", "x\x00y", "名前:*?"]:
        out = sanitize(bad)
        assert "/" not in out and out not in ("", ".", "..") and not out.startswith(".")
        assert all(c.isalnum() or c in "._+=-" for c in out)
