"""The training-data cache: folders of memory-mapped Arrow files, each built once under a fingerprint key.

A cache entry is a folder `<cache_dir>/<kind>-<key>/` holding Arrow IPC files and `meta.json`. It is built
in a temporary folder beside it and renamed into place when complete (`atomic_directory`), so a reader
sees a whole entry or none. Builders of one entry take an exclusive file lock (`<entry>.lock`), so when
several processes (DDP ranks, parallel runs) need the same entry, one builds it and the others wait and
then open it; nobody holds the data as Python objects.

`rebuild` rebuilds an entry once per launch: an entry built after the launch started (by this process or
another rank of it: ranks inherit `CODIEMB_LAUNCH_STARTED` from the process that spawned them) is reused.

A damaged entry is rebuilt, with a warning naming it, never opened. `meta.json` records, for each Arrow file,
its size, row count, modification time and CRC-32, and a SHA-256 of itself. Every open checks, cheaply, that
`meta.json` is intact and that each file has its size, the Arrow magic at both ends, a readable footer, its
row count and consistent offsets in every column without text (catching a truncated, cut-short, garbled or
missing file, and a flipped byte among offsets, which would make reading crash); a file whose modification
time changed (an edit, a copy without `-p`) also has its CRC-32 verified, and `verify=True`
(`data.verify_cache`) verifies every CRC: a byte flipped in place inside the data (a token id, a text) is
found only so (reading a multi-GB cache costs seconds per open, so it is not the default).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text
from codiemb_pl.storage.output_paths import check_writable_folder

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""Bump when the layout of a cache entry or the meaning of its columns changes: old entries are then ignored.
2: `meta.json` records each file's size, rows, mtime and CRC-32, and its own SHA-256.
3: records tables carry teacher scores (IR `teacher_scores`, STS `teacher_score`; STS `score` may be null)."""
META_FILE = "meta.json"
BUILD_LOG = "builds.log"
"""One line per entry built (time, entry, process, rank, seconds), appended in the cache folder."""
LAUNCH_STARTED_ENV = "CODIEMB_LAUNCH_STARTED"


def default_cache_dir() -> Path:
    """`$HF_DATASETS_CACHE/codiemb` (datasets' cache folder, `~/.cache/huggingface/datasets` by default)."""
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "codiemb"


def launch_started() -> float:
    """When this launch started: the first call in the launching process sets it; spawned ranks inherit it."""
    return float(os.environ.setdefault(LAUNCH_STARTED_ENV, repr(time.time())))


def fingerprint(*parts: Any) -> str:
    """A 20-hex-digit key of JSON-serialisable `parts` (with the schema version)."""
    text = json.dumps([SCHEMA_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_state(location: str | Path) -> list:
    """What identifies a file's or folder's content cheaply: absolute path, size and mtime of each file."""
    path = Path(location).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@contextlib.contextmanager
def exclusive_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<entry>.lock` (blocks while another process holds it)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_meta(entry: Path) -> Optional[dict]:
    try:
        return json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError):
        return None


ARROW_MAGIC = b"ARROW1"
CHECKSUM_BYTES = 1 << 24


def file_checksum(path: Path) -> int:
    """CRC-32 of a file, read in 16 MB pieces."""
    crc = 0
    with open(path, "rb") as handle:
        while piece := handle.read(CHECKSUM_BYTES):
            crc = zlib.crc32(piece, crc)
    return crc


def _holds_text(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _holds_text(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _structure_problem(path: Path, rows: int) -> Optional[str]:
    """Why the Arrow file `path` is not a readable table of `rows` rows, or None. Reads its footer and batch
    headers, and checks the offsets of every column without text (token ids, text ids, scores: what training
    reads), which are few (one per row) next to the data; a corrupt offset would make reading crash."""
    try:
        table = open_arrow(path)
        if table.num_rows != rows:
            return f"{path.name} has {table.num_rows} rows, {rows} when built"
        for name, column in zip(table.column_names, table.columns):
            if not _holds_text(column.type):
                column.validate(full=True)
    except (pa.ArrowException, OSError) as error:
        return f"{path.name} cannot be read ({error})"
    return None


def describe_file(path: Path) -> dict:
    """What `meta.json` records of an entry's file; `rows` for Arrow files."""
    state = path.stat()
    record = {"bytes": state.st_size, "mtime_ns": state.st_mtime_ns, "crc32": file_checksum(path)}
    if path.suffix == ".arrow":
        record["rows"] = open_arrow(path).num_rows
    return record


def _meta_digest(meta: dict) -> str:
    body = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _file_problem(path: Path, record: dict, verify: bool) -> Optional[str]:
    """Why the entry's file `path` is not the one built (`record`), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    state = path.stat()
    if state.st_size != record.get("bytes"):
        return f"{path.name} has {state.st_size} bytes, {record.get('bytes')} when built"
    if "rows" in record:
        with open(path, "rb") as handle:
            head = handle.read(len(ARROW_MAGIC))
            handle.seek(-len(ARROW_MAGIC), os.SEEK_END)
            tail = handle.read()
        if head != ARROW_MAGIC or tail != ARROW_MAGIC:
            return f"{path.name} is not a complete Arrow file"
        problem = _structure_problem(path, record["rows"])
        if problem is not None:
            return problem
    if (verify or state.st_mtime_ns != record.get("mtime_ns")) and file_checksum(path) != record.get("crc32"):
        return f"{path.name} differs from what was built (CRC-32)"
    return None


def entry_problem(entry: Path, verify: bool = False) -> Optional[str]:
    """Why the existing folder `entry` cannot be opened as built (see the module docstring), or None."""
    meta = read_meta(entry)
    if meta is None:
        return f"{META_FILE} is missing or unreadable"
    if meta.get("schema_version") != SCHEMA_VERSION:
        return f"schema version {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}"
    if meta.get("checksum") != _meta_digest(meta):
        return f"{META_FILE} differs from what was built (SHA-256)"
    for name, record in (meta.get("files") or {}).items():
        try:
            problem = _file_problem(entry / name, record, verify)
        except OSError as error:  # e.g. replaced by a concurrent rebuild while it was checked
            problem = f"{name} cannot be read ({error})"
        if problem is not None:
            return problem
    return None


def _refresh_times(entry: Path) -> None:
    """After a CRC check passed on files whose mtime changed (a copy), record the new times, so later opens
    skip the check; best effort (a read-only cache keeps checking)."""
    meta = read_meta(entry)
    changed = False
    with contextlib.suppress(OSError, AttributeError):
        for name, record in (meta.get("files") or {}).items():
            mtime = (entry / name).stat().st_mtime_ns
            changed |= record.get("mtime_ns") != mtime
            record["mtime_ns"] = mtime
        if changed:
            meta["checksum"] = _meta_digest(meta)
            atomic_write_text(entry / META_FILE, json.dumps(meta, indent=1, default=str))


def _state(entry: Path, rebuild: bool, verify: bool) -> tuple[bool, Optional[str]]:
    """(whether `entry` can be opened as it is, why it is damaged or None)."""
    if not entry.is_dir():
        return False, None
    problem = entry_problem(entry, verify)
    if problem is not None:
        return False, problem
    _refresh_times(entry)
    return not rebuild or read_meta(entry).get("built_at", 0.0) >= launch_started(), None


def cached_entry(entry: Path, build: Callable[[Path], dict], *, rebuild: bool = False,
                 verify: bool = False) -> tuple[Path, bool]:
    """The folder `entry`, built by `build(tmp_folder) -> meta` unless a usable one exists: (folder, built?).

    `build` writes its files into the temporary folder and returns what goes into `meta.json`; if it raises,
    nothing is left behind and an existing entry stays as it was. A damaged entry is rebuilt with a warning
    (`entry_problem`; `verify`: check every file's CRC-32). The checks run again under the lock, so of several
    processes meeting one damaged entry, one rebuilds it and the others open the rebuilt one.
    """
    launch_started()
    usable, damage = _state(entry, rebuild, verify)
    if usable:
        return entry, False
    check_writable_folder(entry.parent, "data.cache_dir",
                          (f"the entry {entry.name} is damaged ({damage}) and must be rebuilt: " if damage else "")
                          + "set data.cache_dir to a writable folder (a read-only cache must hold every entry)")
    with exclusive_lock(entry):
        usable, damage = _state(entry, rebuild, verify)  # another process may have built it while this one waited
        if usable:
            return entry, False
        if damage is not None:
            logger.warning(f"[codiemb] cache entry {entry} is damaged ({damage}); rebuilding it")
        started = time.time()
        with atomic_directory(entry) as staging:
            meta = dict(build(staging))
            files = {path.name: describe_file(path) for path in sorted(staging.iterdir()) if path.is_file()}
            meta.update(schema_version=SCHEMA_VERSION, built_at=time.time(), files=files)
            meta["checksum"] = _meta_digest(meta)
            (staging / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        with open(entry.parent / BUILD_LOG, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {entry.name} pid={os.getpid()} "
                      f"rank={os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))} "
                      f"seconds={time.time() - started:.1f}\n")
    return entry, True


WRITE_ROWS = 4096
"""Rows per record batch written: small batches make many chunks, and reading one row of a column costs
time in proportion to its chunk count (1M IR records in 3 404 chunks: 144 us a value, 15 us with the
column object kept; `MappedTable.column`)."""


def write_arrow(path: Path, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int:
    """Write record batches to an Arrow IPC file, regrouped into batches of `WRITE_ROWS` rows; the rows written."""
    rows, pending = 0, []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        def flush() -> None:
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
                pending.clear()
        for batch in batches:
            pending.append(batch)
            rows += batch.num_rows
            if sum(b.num_rows for b in pending) >= WRITE_ROWS:
                flush()
        flush()
    return rows


def open_arrow(path: Path) -> pa.Table:
    """A memory-mapped Arrow IPC file as a table: its buffers are pages of the file, not process memory."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class MappedTable:
    """A memory-mapped Arrow file opened on first use in each process; it pickles as its path, so a
    DataLoader worker (fork or spawn) maps the same file instead of receiving a copy of the data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._table: Optional[pa.Table] = None
        self._columns: dict[str, pa.ChunkedArray] = {}

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = open_arrow(self.path)
            self._columns = {}
        return self._table

    def column(self, name: str) -> pa.ChunkedArray:
        """A column, kept: `table[name]` rebuilds its chunk index on every call (slow with many chunks)."""
        table = self.table
        if name not in self._columns:
            self._columns[name] = table.column(name)
        return self._columns[name]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._table = state["path"], None
