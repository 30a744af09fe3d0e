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


def test_quoted_search_path_is_fingerprinted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "userconf"
    (conf / "benchmark").mkdir(parents=True)
    (conf / "benchmark" / "b.yaml").write_text("name: b\n")
    quoted = ([f"hydra.searchpath=['file://{conf}']"], [f'hydra.searchpath=["file://{conf}"]'])
    for i, argv in enumerate(quoted):
        first = fastpath.manifest_path(argv)
        assert first is not None
        (conf / "benchmark" / "b.yaml").write_text(f"name: b\nsubsets: [y{i}]\n")
        assert fastpath.manifest_path(argv) not in (None, first), argv
    missing = ["hydra.searchpath=[file:///no/such/folder]"]
    assert fastpath.manifest_path(missing) is None


def test_environment_and_unknown_resolvers_are_never_vouched_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["seed=${oc.env:SEED}"], ["model.name=${now:%H}"], ["seed=${oc.decode:1}"]):
        assert fastpath.manifest_path(argv) is None, argv
    conf = tmp_path / "userconf"
    (conf / "benchmark").mkdir(parents=True)
    yaml_file = conf / "benchmark" / "b.yaml"
    argv = [f"hydra.searchpath=[file://{conf}]"]
    yaml_file.write_text("name: b\ndata_dir: ${oc.env:SA_BENCH_FP_DATA,/x}\n")
    monkeypatch.setenv("SA_BENCH_FP_DATA", "/one")
    one = fastpath.manifest_path(argv)
    monkeypatch.setenv("SA_BENCH_FP_DATA", "/two")
    assert one is not None and fastpath.manifest_path(argv) not in (None, one)
    yaml_file.write_text("name: b\nstamp: ${now:%H}\n")
    assert fastpath.manifest_path(argv) is None
    yaml_file.write_text("hydra:\n  searchpath: [file:///elsewhere]\n")
    assert fastpath.manifest_path(argv) is None


def test_manifest_on_a_read_only_root_is_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where the root should be")
    fastpath.write_manifest(["seed=0"], [])  # no exception: the manifest is an optimisation
