"""Which weights a model config loads, as a short string for the job key; never loads the model.

- `embedded:<name>` and local directories: a fingerprint of the model's files (`MODEL_FILES`:
  names, sizes, content, see `fingerprint_files`), the same on every machine;
- a hub id: `hub:<id>@<revision>` (`main` when unset; pin `model.revision` to a commit for an
  exact identity). When the offline fallback will be used instead (`HF_HUB_OFFLINE` set, the
  hub copy not in the local cache, the fallback prepared), the fallback's fingerprint.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from sa_bench.launch.identity import fingerprint_files

MODEL_FILES = (
    "config.json", "generation_config.json", "model*.safetensors", "model*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.gguf", "tokenizer*.json",
    "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
"""The files transformers reads for a model and its tokenizer. Other files next to them (a
sparse method's own weights, training notes) are not the model's: changing them keeps the
keys of dense cells."""


def weights_identity(cfg: Any) -> str:
    """`cfg` is a validated `ModelConfig`."""
    source = cfg.source()
    if source in ("embedded", "local"):
        return f"{source}:{files_fingerprint(Path(cfg.resolved_path()))}"
    revision = cfg.revision or "main"
    if cfg.offline_fallback and _hub_offline() and not _in_hub_cache(cfg.pretrained, revision):
        from sa_bench.models.loading import OFFLINE_FALLBACKS

        fallback = OFFLINE_FALLBACKS[cfg.offline_fallback]()
        if fallback is not None:
            return f"fallback:{cfg.offline_fallback}:{files_fingerprint(Path(fallback))}"
    return f"hub:{cfg.pretrained}@{revision}"


def files_fingerprint(folder: Path) -> str:
    """Fingerprint of the model files (`MODEL_FILES`) under `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and any(fnmatch.fnmatch(p.name, pattern) for pattern in MODEL_FILES))
    return fingerprint_files(files, folder)


def _hub_offline() -> bool:
    from sa_bench.models.loading import offline_by_env  # the sweep sets it once (decide_hub)

    return offline_by_env()


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
