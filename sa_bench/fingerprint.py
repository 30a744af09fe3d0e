"""Content fingerprints of the files a cell reads: model weights, fitted method files, data.

Every byte counts (never a partial hash: two checkpoints that differ in a middle layer must
differ). Hashing a 16 GB checkpoint takes a while, so each file's hash is cached per (path,
size, mtime, inode), as content-addressed tools do: in this process, and in a JSON file that
a sweep keeps in its output root (`<output_root>/.sa_bench/fingerprints.json`), so resuming
a sweep reads no weights at all. A file rewritten in place changes its mtime (and usually its
size), so its stale hash is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_FILE = Path(".sa_bench") / "fingerprints.json"


class FingerprintCache:
    """Whole-file content hashes, remembered per (path, size, mtime, inode)."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = file
        self.hashes: dict[str, str] = {}
        self.changed = False
        if file is not None:
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                self.hashes = {k: v for k, v in data.items() if isinstance(v, str)}

    @classmethod
    def in_root(cls, output_root: str | Path) -> FingerprintCache:
        return cls(Path(output_root).expanduser() / CACHE_FILE)

    def content_hash(self, file: Path) -> str:
        st = file.stat()
        entry = f"{os.path.realpath(file)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        found = self.hashes.get(entry)
        if found is None:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            found = self.hashes[entry] = digest.hexdigest()[:16]
            self.changed = True
        return found

    def save(self) -> None:
        """Best effort: a read-only output root just means hashing again next time."""
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.hashes, sort_keys=True))
            os.replace(tmp, self.file)
            self.changed = False
        except OSError:
            pass


def fingerprint_files(files: list[Path], base: Path, cache: FingerprintCache) -> str:
    """Hash of (name relative to `base`, size, full content) of `files`. Modification times are
    left out: a copy of the same files on another machine has the same fingerprint."""
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(base).as_posix()
        digest.update(f"{name}:{file.stat().st_size}:{cache.content_hash(file)}\n".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(benchmark: object, cache: FingerprintCache) -> str | None:
    """Fingerprint of the local files a cell reads (`data_files`, else the files it reads in
    `data_dir`, `Benchmark.data_dir_files`; None there = every file directly in it); None
    for hub or generated data. Part of the cell's identity: two data sets are two cells."""
    data_files = getattr(benchmark, "data_files", None)
    data_dir = getattr(benchmark, "data_dir", None)
    if data_files:
        file = Path(data_files).expanduser()
        return fingerprint_files([file], file.parent, cache) if file.is_file() else "missing"
    if not data_dir:
        return None
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        return "missing"
    named = benchmark.data_dir_files()  # type: ignore[attr-defined]
    if named is None:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        files = [f for f in (Path(n).expanduser() for n in named) if f.is_file()]
    return fingerprint_files(files, folder, cache) if files else "missing"
