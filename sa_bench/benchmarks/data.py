"""Reading benchmark rows from local files or the Hugging Face hub, and prompt splitting.

Local files keep each benchmark's original row format: a folder (`benchmark.data_dir`) holding
the official file names (`<data_dir>/hotpotqa.jsonl`, jsonl / json / parquet), or one explicit
file (`benchmark.data_files`). They are read with `datasets.load_dataset("json"|"parquet")`,
which needs no network. Without either, the benchmark's standard hub location is tried; when
nothing is found a `DataNotFoundError` says which files were looked for and how to get them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

EXTENSIONS = (".jsonl", ".json", ".parquet")
_SENTINEL = "\x00sa_bench_context\x00"


class DataNotFoundError(FileNotFoundError):
    """The data of a benchmark subset could not be found locally or on the hub."""


class BadRowError(ValueError):
    """A data row lacks a field the benchmark needs, or the field has the wrong type."""


FieldTypes = Mapping["str | tuple[str, ...]", "type | tuple[type, ...]"]
"""Field name (or alternative names, the first present is read) -> allowed types."""


def check_rows(rows: list[Any], fields: FieldTypes, where: str) -> list[dict[str, Any]]:
    """`rows` unchanged if each is an object with `fields` of the given types; else
    BadRowError naming `where` (file or hub id), the row (1-based) and the field."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise BadRowError(f"{where}: row {i}: expected an object with fields {sorted(fields)}, "
                              f"got {type(row).__name__}")
        for names, kinds in fields.items():
            options = names if isinstance(names, tuple) else (names,)  # the first one set is read
            name = next((n for n in options if row.get(n) is not None),
                        next((n for n in options if n in row), None))
            if name is None:
                wanted = " or ".join(repr(n) for n in names) if isinstance(names, tuple) else repr(names)
                raise BadRowError(f"{where}: row {i}: missing field {wanted}")
            if not isinstance(row[name], kinds):
                expected = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                raise BadRowError(f"{where}: row {i}: field {name!r} should be {expected}, got "
                                  f"{type(row[name]).__name__} {str(row[name])[:40]!r}")
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of one jsonl / json / parquet file, via `datasets.load_dataset`.

    A json(l) file whose rows Arrow cannot type consistently (e.g. an `answer` that is an
    int in one row and a string in another) is read with the json module instead, which
    keeps the original Python types. A json(l) file that is not valid JSON (a torn last line)
    raises BadRowError naming the file and the line (the `datasets` log of the failure is
    kept quiet: the json module then finds the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"data file not found: {path}")
    fmt = "parquet" if path.suffix == ".parquet" else "json"
    try:
        import datasets

        datasets.disable_progress_bars()
        with _quiet(_DATASETS_JSON_LOGGER if fmt == "json" else None):
            return datasets.load_dataset(fmt, data_files=str(path), split="train").to_list()
    except Exception:
        if fmt != "json":
            raise
    return _read_json(path)


_DATASETS_JSON_LOGGER = "datasets.packaged_modules.json.json"
"""Logs "Failed to load JSON from file ..." (at ERROR, once per handler) before it raises."""


@contextlib.contextmanager
def _quiet(logger_name: str | None) -> Iterator[None]:
    """Silence one logger for the duration (None: nothing)."""
    if logger_name is None:
        yield
        return
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_json(path: str | Path) -> Any:
    """One whole JSON document; BadRowError naming the file and line where it is not JSON."""
    return _parse_document(_read_text(Path(path)), Path(path))


def _parse_document(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRowError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}: column "
                          f"{exc.colno}); a truncated download? fetch the file again") from None


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadRowError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON array, or JSON lines: one value per line (split at "\\n" only, as JSON lines
    are; a U+2028 inside a string is not a line break)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return list(_parse_document(text, path))
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BadRowError(
                    f"{path}: line {number}: not valid JSON ({exc.msg}: column {exc.colno}); "
                    f"each line of a JSON-lines file is one complete JSON object (a torn write?): "
                    f"fix or delete that line"
                ) from None
    return rows


def find_file(data_dir: str | Path, names: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """The first `<data_dir>/<name><ext>` that exists, and every path that was tried."""
    tried = []
    for name in names:
        for ext in EXTENSIONS:
            candidate = Path(data_dir) / f"{name}{ext}"
            tried.append(candidate)
            if candidate.is_file():
                return candidate, tried
    return None, tried


def files_found(data_dir: str | None, names: Sequence[str]) -> list[Path]:
    """[the file `load_rows` reads from `data_dir` for `names`], or [] (none there, or no
    data_dir): what the data fingerprint of the cell covers."""
    found = find_file(data_dir, names)[0] if data_dir else None
    return [found] if found is not None else []


def load_rows(
    *,
    benchmark: str,
    subset: str,
    data_dir: str | None,
    data_files: str | None,
    names: Sequence[str],
    hub: Callable[[], list[dict[str, Any]]] | None,
    hub_id: str,
    how_to_get: str,
    fields: FieldTypes | None = None,
) -> list[dict[str, Any]]:
    """The raw rows of one subset: `data_files`, else `data_dir/<name>.*`, else the hub.

    `names` are the official file names without extension (tried in order); `hub` fetches
    the rows from the hub (may raise when offline); `how_to_get` tells the user where the
    files come from. Raises DataNotFoundError naming every location tried, and BadRowError
    (file, row, field) for a row without the `fields` the benchmark needs.
    """
    if data_files:
        if not Path(data_files).is_file():
            raise DataNotFoundError(
                f"{benchmark}/{subset}: benchmark.data_files={data_files} does not exist. "
                f"{how_to_get}"
            )
        return check_rows(read_rows(data_files), fields or {}, str(data_files))
    if data_dir:
        found, tried = find_file(data_dir, names)
        if found is None:
            listed = ", ".join(str(p) for p in tried)
            raise DataNotFoundError(
                f"{benchmark}/{subset}: none of these files exist: {listed}. {how_to_get}"
            )
        return check_rows(read_rows(found), fields or {}, str(found))
    if hub is None:
        raise DataNotFoundError(
            f"{benchmark}/{subset}: no hub copy; set benchmark.data_dir or benchmark.data_files. "
            f"{how_to_get}"
        )
    try:
        rows = hub()
    except Exception as exc:
        raise DataNotFoundError(
            f"{benchmark}/{subset}: could not load it from the hub ({hub_id}): "
            f"{type(exc).__name__}: {str(exc)[:300]}. Offline, set benchmark.data_dir to a folder "
            f"with {' or '.join(n + '.jsonl' for n in names[:2])} (jsonl/json/parquet). "
            f"{how_to_get}"
        ) from exc
    return check_rows(rows, fields or {}, hub_id)


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """Download (or take from the HF cache) one file of a hub dataset repository at
    `revision` (None: main)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                                revision=revision))


def hub_zip_member(repo_id: str, archive: str, member: str,
                   revision: str | None = None) -> list[dict[str, Any]]:
    """Rows of the jsonl file inside the zip `archive` of a hub dataset repository whose path
    is `member` or ends with `/member` (archives differ in their top folder), extracted once
    next to the cached archive (in the HF cache's folder of the revision's commit)."""
    zip_path = hub_file(repo_id, archive, revision)
    with zipfile.ZipFile(zip_path) as zf:
        name = next((n for n in zf.namelist() if n == member or n.endswith("/" + member)), None)
        if name is None:
            raise FileNotFoundError(f"{zip_path}: no {member} inside")
        target = zip_path.parent / (zip_path.name + ".extracted") / name
        if not target.is_file():
            zf.extract(name, target.parents[len(Path(name).parts) - 1])
    return read_rows(target)


def hub_dataset(repo_id: str, config: str | None = None, split: str = "test",
                revision: str | None = None) -> list[dict]:
    """Rows of a (script-free) hub dataset via `datasets.load_dataset` at `revision`
    (None: main)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(repo_id, config, split=split, revision=revision).to_list()


def split_prompt(template: str, context_field: str = "context", **fields: Any) -> tuple[str, str]:
    """Format `template` and split it right after the long document.

    Returns (everything up to and including `fields[context_field]`, the rest), so that
    `context + question` is exactly `template.format(**fields)`.
    """
    document = fields[context_field]
    formatted = template.format(**{**fields, context_field: _SENTINEL})
    head, sep, tail = formatted.partition(_SENTINEL)
    if not sep:
        raise ValueError(f"template has no {{{context_field}}} field")
    return head + document, tail.replace(_SENTINEL, document)
