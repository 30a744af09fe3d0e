"""A benchmark that lives outside the package, as a user's own would, for end-to-end tests.

It is the passkey benchmark, plus two test hooks driven by environment variables (which
cannot change a job's identity): SA_BENCH_TEST_FAIL names subsets whose loading raises,
SA_BENCH_TEST_LOG names a file that gets one line per job that loaded data, and
SA_BENCH_TEST_SLEEP makes each load take that long.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from sa_bench.benchmarks.passkey import Passkey


@dataclass
class ProbePasskey(Passkey):
    def load(self, tokenizer):
        log = os.environ.get("SA_BENCH_TEST_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{self.subset} {os.getpid()}\n")
        time.sleep(float(os.environ.get("SA_BENCH_TEST_SLEEP", "0")))
        if self.subset in os.environ.get("SA_BENCH_TEST_FAIL", "").split(","):
            raise RuntimeError(f"injected failure for subset {self.subset}")
        return super().load(tokenizer)


def write_probe_config(conf_dir: Path) -> None:
    """conf_dir/benchmark/probe.yaml: a benchmark added by dropping in one file."""
    (conf_dir / "benchmark").mkdir(parents=True, exist_ok=True)
    (conf_dir / "benchmark" / "probe.yaml").write_text(
        "_target_: tests.e2e_support.ProbePasskey\n"
        "name: probe\n"
        "subsets: [1k, 2k]\n"
        "n_samples: 2\n"
        "generation_tokens: 6\n"
    )
