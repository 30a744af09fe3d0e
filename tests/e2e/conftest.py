"""Everything under tests/e2e/ starts `python -m sa_bench` (or a cluster) in a subprocess: all of
it is marked `e2e`, so `python -m pytest -m "not e2e"` runs the unit tests alone. (Unit files mark
their few tests that start a sweep one by one.)"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # a conftest's hook sees every collected item, not only those below it: filter by path
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
