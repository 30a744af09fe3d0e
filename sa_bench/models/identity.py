"""Which weights a model config loads, as a short string for the job key; never loads the model.

- `embedded:<name>` and local directories: `files:` and a fingerprint of the model's files
  (`MODEL_FILES`, and with `trust_remote_code` its code `*.py`: names, sizes, full content),
  the same on every machine and for the embedded model and a copy of it anywhere;
- a hub id: `hub:<id>@<revision>` (`main` when unset; pin `model.revision` to a commit for an
  exact identity). When the offline fallback will be used instead (the sweep is offline, the
  hub copy not in the local cache, the fallback prepared), the fallback's fingerprint.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from sa_bench.fingerprint import FingerprintCache, fingerprint_files
from sa_bench.models.loading import OFFLINE_FALLBACKS

MODEL_FILES = (
    "config.json", "generation_config.json", "model*.safetensors", "model*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.gguf", "tokenizer*.json",
    "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
    "*.jinja",  # chat_template.jinja, additional_chat_templates/<name>.jinja
)
"""The files transformers reads for a model and its tokenizer. Other files next to them (a
sparse method's own weights, training notes) are not the model's: changing them keeps the
keys of dense cells."""

CODE_FILES = ("*.py",)
"""The model's own code, run with `trust_remote_code`."""


def weights_identity(cfg: Any, offline: bool, cache: FingerprintCache) -> str:
    """`cfg` is a validated `ModelConfig`; `offline`: the sweep cannot reach the hub."""
    code = cfg.trust_remote_code
    if cfg.source() in ("embedded", "local"):
        return f"files:{files_fingerprint(Path(cfg.resolved_path()), cache, code)}"
    revision = cfg.revision or "main"
    if cfg.offline_fallback and offline and not _in_hub_cache(cfg.pretrained, revision):
        fallback = OFFLINE_FALLBACKS[cfg.offline_fallback]()
        if fallback is not None:
            return f"fallback:{cfg.offline_fallback}:{files_fingerprint(Path(fallback), cache, code)}"
    return f"hub:{cfg.pretrained}@{revision}"


def files_fingerprint(folder: Path, cache: FingerprintCache, code: bool = False) -> str:
    """Fingerprint of the model files (`MODEL_FILES`; `code`: and `CODE_FILES`) under `folder`."""
    return fingerprint_files(model_files(folder, code), folder, cache)


def model_files(folder: Path, code: bool = False) -> list[Path]:
    patterns = MODEL_FILES + CODE_FILES if code else MODEL_FILES
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, located as huggingface_hub does (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _in_hub_cache(repo_id: str, revision: str) -> bool:
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    return (repo / "refs" / revision).is_file() or (repo / "snapshots" / revision).is_dir()


def local_config(cfg: Any) -> dict:
    """The model's config.json where it is on disk (embedded, local, the hub cache), else {}."""
    if cfg.source() in ("embedded", "local"):
        file = Path(cfg.resolved_path()) / "config.json"
    else:
        repo = hub_cache_dir() / f"models--{cfg.pretrained.replace('/', '--')}"
        ref = repo / "refs" / (cfg.revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else (cfg.revision or "main")
        file = repo / "snapshots" / commit / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolved_dtype(cfg: Any, device: str) -> str:
    """The dtype a job on `device` ("cuda" or "cpu") loads: `auto` is float32 on CPU and the
    checkpoint's own dtype on a GPU (read from its config.json where it is on disk, else
    `checkpoint`: fixed by the weights identity). Part of the job key; torch-free."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if device == "cpu":
        return "float32"
    config = local_config(cfg)
    found = config.get("dtype") or config.get("torch_dtype")
    return found if found in ("float32", "bfloat16", "float16") else "checkpoint"


def flash_attn_installed() -> bool:
    """Whether flash_attn is installed: found, not imported (no torch here). The key and the
    job both decide on this; a job whose flash_attn does not import is refused
    (`sa_bench.attention.dense.resolve_implementation`) rather than run SDPA under the key."""
    return importlib.util.find_spec("flash_attn") is not None


def resolved_kernel(cfg: Any, device: str, dtype: str) -> str:
    """The dense kernel a job runs (`attn_implementation: auto` resolved as
    `sa_bench.attention.dense.resolve_implementation` does at run time, without torch)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device == "cuda" and dtype in ("float16", "bfloat16", "checkpoint") and flash_attn_installed():
        return "flash_attention_2" if dtype != "checkpoint" else "auto"
    return "sdpa"
