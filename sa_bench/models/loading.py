"""Model settings (`conf/model/<name>.yaml`) and loading.

    cfg = sa_bench.config.build(ModelConfig, section, "model")   # cheap, no torch
    model, tokenizer = load_model(cfg, devices)                  # devices: CUDA ids, [] = CPU

`pretrained` is one of
- `embedded:<name>`: a model shipped inside the package (`sa_bench/models/embedded/<name>`),
  written this way (not as an absolute path) so job directories hash the same everywhere;
- a local directory (`/...`, `./...`, `../...`, `~...`, or any existing directory), checked
  at validation time;
- a Hugging Face hub id, loaded from the local hub cache or downloaded by transformers.

`offline_fallback` names a converted local checkpoint used when the hub id cannot be
loaded (no network, not in the cache): currently `smollm2-135m-instruct-gguf`, produced by
`python -m sa_bench.models.smollm2_offline`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sa_bench.config import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_ROOT = Path(__file__).resolve().parent / "embedded"
LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def embedded_dir(name: str) -> Path:
    """Directory of the embedded model `name` (`tiny-retrieval` and `tiny_retrieval` agree)."""
    return EMBEDDED_ROOT / name.replace("-", "_")


def embedded_names() -> list[str]:
    if not EMBEDDED_ROOT.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_ROOT.iterdir() if (p / "config.json").is_file())


def is_local_path(pretrained: str) -> bool:
    return pretrained.startswith(LOCAL_PREFIXES) or os.path.isdir(pretrained)


@dataclass
class ModelConfig:
    name: str
    """Short name used in job directories and tables."""
    pretrained: str
    """Hub id, local directory, or `embedded:<name>`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: the checkpoint's dtype on GPU, float32 on CPU."""
    max_context: int = 4096
    """Maximum number of tokens of prompt + generation; longer prompts are truncated."""
    chat_template: bool = False
    """Apply the tokenizer's chat template (instruct models)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments for `apply_chat_template` (e.g. `enable_thinking: false` for Qwen3)."""
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Kernel for prefill and every dense layer or phase (`sa_bench.attention.dense`): `auto` =
    flash-attention 2 where installed on CUDA with half weights, else torch SDPA; `eager` is the
    exact (slow, quadratic-memory) reference."""
    prefill_chunk: int | None = 4096
    """Context tokens per prefill forward pass (bounds activation memory); null = one pass."""
    offline_fallback: str | None = None
    """Converted local checkpoint used when the hub id cannot be loaded (see module doc)."""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise ConfigError(f"name: expected a short name without '/', got {self.name!r}")
        if not self.pretrained:
            raise ConfigError("pretrained: expected a hub id, a local directory or embedded:<name>")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk: expected an int >= 1 or null, got {self.prefill_chunk}")
        if self.max_context < 16:
            raise ConfigError(f"max_context: expected an int >= 16, got {self.max_context}")
        if self.pretrained.startswith(EMBEDDED_PREFIX):
            emb = self.pretrained[len(EMBEDDED_PREFIX):]
            if not (embedded_dir(emb) / "config.json").is_file():
                raise ConfigError(
                    f"pretrained: no embedded model {emb!r}; available: {embedded_names()}"
                )
        elif is_local_path(self.pretrained):
            path = Path(self.pretrained).expanduser()
            if not path.is_dir():
                raise ConfigError(
                    f"pretrained: local model directory {self.pretrained!r} does not exist "
                    f"(set model.pretrained to an existing directory, a hub id or embedded:<name>)"
                )
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"pretrained: {self.pretrained!r} has no config.json (not a transformers checkpoint)"
                )
        if self.offline_fallback is not None and self.offline_fallback not in OFFLINE_FALLBACKS:
            raise ConfigError(
                f"offline_fallback: expected one of {sorted(OFFLINE_FALLBACKS)} or null, "
                f"got {self.offline_fallback!r}"
            )

    def source(self) -> str:
        """Where the weights come from: `embedded`, `local` or `hub`."""
        if self.pretrained.startswith(EMBEDDED_PREFIX):
            return "embedded"
        return "local" if is_local_path(self.pretrained) else "hub"

    def resolved_path(self) -> str:
        """Directory or hub id to hand to `from_pretrained`."""
        if self.pretrained.startswith(EMBEDDED_PREFIX):
            return str(embedded_dir(self.pretrained[len(EMBEDDED_PREFIX):]))
        if is_local_path(self.pretrained):
            return str(Path(self.pretrained).expanduser().resolve())
        return self.pretrained


def _fallback_smollm2() -> str | None:
    from sa_bench.models.smollm2_offline import converted_dir

    path = converted_dir()
    return str(path) if (path / "config.json").is_file() else None


OFFLINE_FALLBACKS = {"smollm2-135m-instruct-gguf": _fallback_smollm2}


def offline_by_env() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) says: use only local files."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_offline(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub is out of reach: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is
    set, or its endpoint (HF_ENDPOINT) does not answer within `timeout` seconds.

    Without this, every load of an uncached hub id spends ~30 s in huggingface_hub's retries
    before the offline fallback is tried. A sweep asks once and hands the answer to its jobs
    through `go_offline` (the environment its workers inherit).
    """
    if offline_by_env():
        return True
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return False  # it answered
    except (OSError, ValueError):
        return True
    return False


def go_offline() -> None:
    """Use only local files from now on, in this process and the processes it starts."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")  # read at import: patch it too
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _torch_dtype(cfg: ModelConfig, devices: list[int]) -> Any:
    import torch

    if cfg.dtype == "auto":
        return "auto" if devices else torch.float32
    return getattr(torch, cfg.dtype)


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    path = path or cfg.resolved_path()
    if cfg.source() == "embedded" or Path(path, "tokenizer_config.json").is_file() and \
            _tokenizer_class(path) in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _tokenizer_class(path: str) -> str | None:
    import json

    try:
        return json.loads(Path(path, "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def _placement(devices: list[int]) -> dict[str, Any]:
    """from_pretrained kwargs that place the weights on exactly the leased devices: one GPU
    gets every weight loaded straight onto it (no full copy in host memory first: eight jobs
    of an 8B model on one node would hold 128 GB of host RAM while loading); several share
    the model (`balanced`)."""
    import torch

    if len(devices) == 1:
        return {"device_map": {"": devices[0]}}
    max_memory: dict[Any, Any] = {}
    for d in devices:
        free, _total = torch.cuda.mem_get_info(d)
        max_memory[d] = int(free * 0.9)
    return {"device_map": "balanced", "max_memory": max_memory}


def load_model(cfg: ModelConfig, devices: list[int] | tuple[int, ...] = ()) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode, placed on `devices` (CUDA ids) or the CPU."""
    devices = list(devices)
    path = cfg.resolved_path()
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(cfg, devices),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.source() == "hub" and cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    # the kernel used at run time is installed by SparseMethod.installed; load with the
    # matching transformers implementation so the model's own path agrees with it
    kwargs["attn_implementation"] = "eager" if cfg.attn_implementation == "eager" else "sdpa"
    if devices:
        kwargs.update(_placement(devices))

    source = cfg.source()
    if source == "hub" and hub_offline():
        go_offline()  # fail fast on an uncached id instead of retrying, then fall back
    try:
        model = _from_pretrained(path, kwargs)
        tokenizer = load_tokenizer(cfg, path)
    except OSError as exc:  # hub id unreachable and not cached
        fallback = OFFLINE_FALLBACKS[cfg.offline_fallback]() if (
            source == "hub" and cfg.offline_fallback) else None
        if fallback is None:
            raise
        # not on the console of every job: env.json records it and a sweep's summary says
        # it once
        log.debug("cannot load %s from the hub (%s); using offline fallback %s",
                  cfg.pretrained, str(exc).splitlines()[0], fallback)
        kwargs.pop("revision", None)
        model = _from_pretrained(fallback, kwargs)
        tokenizer = load_tokenizer(cfg, fallback)
        path, source = fallback, f"offline_fallback:{cfg.offline_fallback}"

    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.sa_bench_source = {"source": source, "path": path}
    return model, tokenizer


def _from_pretrained(path: str, kwargs: dict[str, Any]) -> Any:
    """`AutoModelForCausalLM.from_pretrained`; a model class that refuses SDPA (GPT-OSS: its
    sinks) loads with its eager attention, the path it runs itself (sa_bench's kernel is
    installed over it at run time either way)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if kwargs.get("attn_implementation") != "sdpa" or "scaled_dot_product" not in str(exc):
            raise
        return AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})
