from sa_bench.launch import fastpath


def test_only_plain_sweeps_take_the_fast_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fastpath.manifest_path(["seed=0,1"]) is not None
    assert fastpath.manifest_path(["-m", "seed=0,1"]) == fastpath.manifest_path(["seed=0,1"])
    for argv in (["--help"], ["plan=true"], ["overwrite=true"], ["--cfg", "job"],
                 ["hydra.searchpath=[pkg://my.pkg]"], ["output_root=${oc.env:X}"]):
        assert fastpath.manifest_path(argv) is None, argv
    assert not fastpath.resume_if_all_done(["seed=0,1"])  # no manifest yet


def test_fingerprint_follows_arguments_and_config_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "userconf"
    (conf / "benchmark").mkdir(parents=True)
    (conf / "benchmark" / "b.yaml").write_text("name: b\n")
    argv = [f"hydra.searchpath=[file://{conf}]", "benchmark=b"]
    first = fastpath.manifest_path(argv)
    assert first == fastpath.manifest_path(list(argv))
    assert first != fastpath.manifest_path([*argv, "seed=1"])
    assert str(first.parent) == "outputs/.sa_bench/sweeps"  # relative to the working dir
    (conf / "benchmark" / "b.yaml").write_text("name: b\nsubsets: [x]\n")
    assert fastpath.manifest_path(argv) != first
