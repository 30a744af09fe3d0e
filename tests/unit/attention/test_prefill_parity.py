"""Prefill patterns equal to the reference code's on the same Q and K: fixtures made by running
the reference's own estimation functions (tests/fixtures/prefill/README.md says how)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from sa_bench.attention.prefill_methods import FlexPrefill, VerticalSlash  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

PREFILL = FIXTURES / "prefill"
SPARSE_FRONTIER = torch.load(PREFILL / "sparse_frontier.pt")
CASES = SPARSE_FRONTIER["cases"]


def as_sets(rows) -> list[set[int]]:
    return [set(int(x) for x in row) for row in rows]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['key'].shape[2]}")
def test_vertical_slash_equals_sparse_frontier(case):
    p = case["vertical_slash"]["params"]
    method = VerticalSlash(vertical_size=p["vertical_size"], slash_size=p["slash_size"],
                           last_q=p["last_q"], keep_first=p["topk_vertical_inf"],
                           keep_last=p["topk_slash_inf"], block=16)
    columns, offsets = method.estimate(case["query"], case["key"], 0)
    assert as_sets(columns[0]) == as_sets(case["vertical_slash"]["columns"][0])
    assert as_sets(offsets[0]) == as_sets(case["vertical_slash"]["offsets"][0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['key'].shape[2]}")
def test_flexprefill_equals_sparse_frontier(case):
    p = case["flexprefill"]["params"]
    method = FlexPrefill(alpha=p["alpha"], approximation=p["approximation_size"],
                         min_budget=p["min_budget"], block=16)
    kv = case["key"].shape[2]
    columns, offsets = method.estimate(case["query"], case["key"], 0)
    assert [c - {kv} for c in as_sets(columns[0])] == as_sets(case["flexprefill"]["columns"])
    assert as_sets(offsets[0]) == as_sets(case["flexprefill"]["offsets"])
