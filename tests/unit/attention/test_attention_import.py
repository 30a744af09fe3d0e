"""Validating sparse configs, as the sweeper does on every resume, must not import torch."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# In a fresh interpreter: every conf/sparse/*.yaml through SparseMethod.from_config (the
# model's ${model.pretrained} is the embedded model, which ships the hashattn and double
# sparsity files that `auto` looks up), then one whole cell through JobSpec.from_dict, then the
# type hints of every config class (job keys evaluate them).
SCRIPT = """
import glob, os, sys
import yaml
from sa_bench.attention import SparseMethod
from sa_bench.spec import JobSpec

model = "embedded:tiny-retrieval"
sections = {}
for path in sorted(glob.glob(os.path.join("conf", "sparse", "*.yaml"))):
    with open(path) as f:
        section = yaml.safe_load(f.read().replace("${model.pretrained}", model))
    section["name"] = os.path.basename(path)[:-5]
    SparseMethod.from_config(section)
    sections[section["name"]] = section
assert len(sections) >= 10, sorted(sections)
with open(os.path.join("conf", "model", "tiny.yaml")) as f:
    model_section = yaml.safe_load(f)
with open(os.path.join("conf", "benchmark", "passkey.yaml")) as f:
    benchmark = yaml.safe_load(f)
benchmark["subset"] = "1k"
JobSpec.from_dict({"model": model_section, "sparse": sections["hashattn"], "benchmark": benchmark,
                   "pool": {"devices": "cpu"}, "seed": 0})
# the type hints of every config class and of its fields' classes, as job keys read them
from sa_bench.launch.key_defaults import config_classes
config_classes()
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("torch modules:", loaded[:5])
sys.exit(1 if loaded else 0)
"""


def test_validating_every_sparse_config_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lazy_module_caches_attributes():
    from sa_bench.lazy import LazyModule

    lazy = LazyModule("json")
    assert "dumps" not in vars(lazy)
    assert lazy.dumps([1]) == "[1]"
    assert "dumps" in vars(lazy)  # a later lookup is a plain attribute hit
