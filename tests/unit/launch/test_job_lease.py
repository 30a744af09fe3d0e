"""Issue 21 item 5: a failed (out-of-memory) job frees its memory before its device lease ends,
and every job starts its own peak-memory count on every leased device."""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from sa_bench import job, runner


class _Big:
    """Stands for the model / KV cache a failed job's frames still reference."""


def _fake_lease(events):
    @contextmanager
    def lease(cfg, job_dir=None):
        events.append("acquire")
        try:
            yield SimpleNamespace(torch_devices=[])
        finally:
            events.append("release")
    return lease


def test_failed_job_frees_memory_inside_the_lease(monkeypatch, tmp_path):
    events: list[str] = []
    refs: list[weakref.ref] = []
    alive_at_free: list[bool] = []

    def evaluate(spec, path, held, weights):
        cache = _Big()  # a local of the failing frame, as the model and cache are
        refs.append(weakref.ref(cache))
        raise MemoryError("CUDA out of memory")

    def free():
        gc.collect()
        alive_at_free.append(refs[0]() is not None)
        events.append("free")

    import sa_bench.launch.pool as pool
    monkeypatch.setattr(pool, "lease", _fake_lease(events))
    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(job, "_free_accelerator_memory", free)
    with pytest.raises(MemoryError) as info:
        job.evaluate_leased(SimpleNamespace(pool=None), tmp_path, None)
    assert events == ["acquire", "free", "release"]
    assert alive_at_free == [False], "the exception's frames still held the job's tensors"
    text = "".join(__import__("traceback").format_exception(info.value))
    assert "CUDA out of memory" in text and "def evaluate" not in text  # the error text is intact
    assert "raise MemoryError" in text


def test_chained_exceptions_are_cleared_too(monkeypatch, tmp_path):
    events: list[str] = []
    refs: list[weakref.ref] = []

    def inner():
        cache = _Big()
        refs.append(weakref.ref(cache))
        raise MemoryError("first")

    def evaluate(spec, path, held, weights):
        try:
            inner()
        except MemoryError:
            raise RuntimeError("while handling") from None

    def free():
        gc.collect()
        events.append(("free", refs[0]() is None))

    import sa_bench.launch.pool as pool
    monkeypatch.setattr(pool, "lease", _fake_lease(events))
    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(job, "_free_accelerator_memory", free)
    with pytest.raises(RuntimeError):
        job.evaluate_leased(SimpleNamespace(pool=None), tmp_path, None)
    assert events == ["acquire", ("free", True), "release"]


def test_successful_job_also_frees_before_release(monkeypatch, tmp_path):
    events: list[str] = []
    import sa_bench.launch.pool as pool
    monkeypatch.setattr(pool, "lease", _fake_lease(events))
    monkeypatch.setattr(runner, "evaluate", lambda *a: {"ok": 1})
    monkeypatch.setattr(job, "_free_accelerator_memory", lambda: events.append("free"))
    assert job.evaluate_leased(SimpleNamespace(pool=None), tmp_path, None) == {"ok": 1}
    assert events == ["acquire", "free", "release"]


def test_peak_memory_reset_and_read_on_every_leased_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    calls: list[tuple[str, int]] = []
    peaks = {0: 5, 3: 9}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda d: calls.append(("read", d)) or peaks[d])
    runner.reset_peak_memory([0, 3])
    got = runner.peak_memory([0, 3])
    assert calls == [("reset", 0), ("reset", 3), ("read", 0), ("read", 3)]
    assert got == {"peak_memory_bytes": 9, "peak_memory_bytes_per_device": {"0": 5, "3": 9}}


def test_each_job_resets_the_peak_before_loading(monkeypatch, tmp_path):
    """evaluate() resets the count before the model is loaded, once per job (reused worker)."""
    events: list[str] = []
    monkeypatch.setattr(runner, "reset_peak_memory", lambda devs: events.append(("reset", devs)))

    def load_model(model, devices):
        events.append("load")
        raise RuntimeError("stop here")

    import sa_bench.models.loading as loading
    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(loading, "load_tokenizer", lambda model: events.append("tokenizer"))
    spec = SimpleNamespace(seed=0, model=SimpleNamespace(source=lambda: "embedded"),
                           benchmark=SimpleNamespace(load=lambda tokenizer: []), sparse=None)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stop here"):
            runner.evaluate(spec, tmp_path, SimpleNamespace(torch_devices=[1, 2]))
    assert events == [("reset", [1, 2]), "tokenizer", "load", ("reset", [1, 2]), "tokenizer", "load"]


def test_cpu_peak_is_this_jobs():
    runner.reset_peak_memory([])
    before = runner.peak_memory([])["peak_memory_bytes"]
    assert before > 0
    block = bytearray(64 << 20)  # touched: 64 MiB resident
    block[::4096] = b"\1" * len(block[::4096])
    assert runner.peak_memory([])["peak_memory_bytes"] >= before + (48 << 20)
    del block
