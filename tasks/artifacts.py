"""Artifact files: written atomically, named by content hash, described for the run manifest.

A stage writes to a temporary file in the target folder and renames it into place, so a crash
or an interrupt never leaves a half-written file under a final name. Files are named
``<stem>-<sha8>.<ext>`` after the sha256 of their bytes: the same content, the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trace_realign.core.data import file_sha256
from trace_realign.core.triage import TRAINABLE, TriagedPair, table_to_triaged

def folder_sha256(path: str | Path, pattern: str = "*", file_hash=file_sha256) -> str:
    """sha256 over the relative names and contents of every file below ``path`` matching ``pattern``
    (``file_hash(path) -> hex`` hashes one file)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()


class HashMemo:
    """sha256 of files by content, remembered per (path, size, mtime, ctime, inode).

    Hashing a 500 MB model folder on every run would cost seconds; a file whose size, times and
    inode are all unchanged has unchanged bytes (the change time cannot be set back by a user the
    way a modification time can), so its remembered hash is reused. The memo is a JSON file in the
    working folder, replaced atomically; a lost or corrupt memo only costs a re-hash.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[str, list] = {}
        self._dirty = False
        if self.path is not None:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._entries = {}

    def file(self, path: str | Path) -> str:
        """The sha256 of a file's bytes."""
        p = Path(path).resolve()
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        known = self._entries.get(str(p))
        if isinstance(known, list) and len(known) == 2 and known[0] == stamp:
            return known[1]
        digest = file_sha256(p)
        self._entries[str(p)] = [stamp, digest]
        self._dirty = True
        return digest

    def content(self, path: str | Path) -> str:
        """The sha256 of a file, or of a folder's relative file names and contents (as
        :func:`folder_sha256`); raises FileNotFoundError when ``path`` does not exist."""
        p = Path(path)
        if p.is_file():
            return self.file(p)
        if not p.is_dir():
            raise FileNotFoundError(str(path))
        return folder_sha256(p, file_hash=self.file)

    def save(self) -> None:
        """Write the memo back (only when something new was hashed)."""
        if self.path is not None and self._dirty:
            live = {k: v for k, v in self._entries.items() if Path(k).exists()}
            write_json_at(live, self.path)
            self._dirty = False


def _publish(tmp: Path, folder: Path, stem: str, ext: str) -> Path:
    digest = file_sha256(tmp)
    final = folder / f"{stem}-{digest[:8]}.{ext}"
    os.replace(tmp, final)
    return final


def _temp(folder: Path, ext: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix="." + ext, dir=folder)
    os.close(fd)
    return Path(name)


def write_parquet(table: pa.Table, folder: str | Path, stem: str) -> Path:
    """Write ``table`` atomically as ``<stem>-<sha8>.parquet`` in ``folder``."""
    folder = Path(folder)
    tmp = _temp(folder, "parquet")
    try:
        pq.write_table(table, tmp)
        return _publish(tmp, folder, stem, "parquet")
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, folder: str | Path, stem: str, ext: str) -> Path:
    """Write ``text`` atomically as ``<stem>-<sha8>.<ext>`` in ``folder``."""
    folder = Path(folder)
    tmp = _temp(folder, ext)
    try:
        tmp.write_text(text, encoding="utf-8")
        return _publish(tmp, folder, stem, ext)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: Any, folder: str | Path, stem: str) -> Path:
    """Write ``data`` atomically as ``<stem>-<sha8>.json`` in ``folder``."""
    return write_text(json.dumps(data, indent=2, sort_keys=True, default=str), folder, stem, "json")


def write_json_at(data: Any, path: str | Path) -> Path:
    """Write ``data`` atomically at a fixed path (e.g. a run's manifest)."""
    path = Path(path)
    tmp = _temp(path.parent, "json")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, path)
        return path
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(build: Path, final: Path) -> Path:
    """Move a fully built folder into place; an existing folder of the same name is replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(build, final)
    return final


def describe(path: str | Path, rows: int | None = None) -> dict[str, Any]:
    """What the manifest records about an artifact: path, sha256 and row count."""
    p = Path(path)
    if p.is_dir():
        return {"path": str(p), "sha256": folder_sha256(p), "rows": rows, "kind": "folder"}
    if rows is None and p.suffix == ".parquet":
        rows = pq.ParquetFile(p).metadata.num_rows
    return {"path": str(p), "sha256": file_sha256(p), "rows": rows, "kind": "file"}


def read_parquet(path: str | Path) -> pa.Table:
    return pq.read_table(path)


def read_triaged(
    shards: dict[str, list[dict]], kinds: tuple[str, ...] = tuple(t.value for t in TRAINABLE)
) -> list[TriagedPair]:
    """The triaged pairs of the triage stage's shards of ``kinds`` (its artifact names: the triage
    types and ``holdout``), in shard order."""
    out = []
    for kind in kinds:
        for shard in shards.get(kind, []):
            out.extend(table_to_triaged(read_parquet(shard["path"])))
    return out
