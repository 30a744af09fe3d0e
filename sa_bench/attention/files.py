"""What maskers with fitted files read about the model: its attention shapes, and the file
fitted for it (hashattn weights, double-sparsity calibration)."""

from __future__ import annotations

from pathlib import Path

from sa_bench.config import ConfigError
from sa_bench.models.loading import EMBEDDED_PREFIX, embedded_dir, is_local_path


def model_shapes(model_config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a transformers config."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, kv_heads, head_dim


def model_file(pretrained: str, name: str) -> Path | None:
    """A method's file shipped next to a model (`embedded:<name>` or a local directory), or None.

    Used by maskers whose `auto` setting means "the file fitted for this model" (hashattn
    weights, double-sparsity calibration); a hub id has no directory of its own here.
    """
    if pretrained.startswith(EMBEDDED_PREFIX):
        folder = embedded_dir(pretrained[len(EMBEDDED_PREFIX):])
    elif is_local_path(pretrained):
        folder = Path(pretrained).expanduser()
    else:
        return None
    path = folder / name
    return path if path.is_file() else None


def method_file(value: str, model: str | None, name: str, key: str, what: str,
                missing: str) -> Path:
    """The file a masker reads: `value` itself, or for `auto` the file `name` next to `model`.

    Raises ConfigError naming `key`: a given file that does not exist (`what` names its kind),
    `auto` without a model, or `missing` when the model has no such file.
    """
    if value != "auto":
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: {what} file not found: {value}")
        return path
    if model is None:
        raise ConfigError(f"{key}: 'auto' looks up the model's {what} file, but `model` is not "
                          "set (the method config sets model: ${model.pretrained}); or give a file")
    path = model_file(model, name)
    if path is None:
        raise ConfigError(f"{key}: {missing}")
    return path
