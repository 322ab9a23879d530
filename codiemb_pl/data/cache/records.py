"""Training sources as memory-mapped Arrow tables: validated once, cached, shared by every rank and worker.

A source's records table is keyed by the source's fingerprint: its resolved location and file state
(path, size, mtime of each file; a hub dataset's own fingerprint), format, split, subset, columns,
score range and the cache schema version. It holds every row of the source in file order; `max_samples`
and `seed` select rows when the table is opened (`sources.subsample_positions`).

IR table: `query` (string), `positives`, `negatives` (list<string>), `positive_text_ids`,
`negative_text_ids` (list<int64>: `text_id` of each text, for the cross-device duplicate mask),
`teacher_scores` (list<float64>, null when the record has none: one per positive, then per negative).
STS table: `text1`, `text2` (string), `score` (float64, as in the file; null for a pair with a teacher score
only), `teacher_score` (float64 in [0, 1], or null); `meta.json` holds the score range `[lo, hi]`, and a
record's normalised score is `(score - lo) / (hi - lo)`.

JSON-lines sources are parsed in column batches (`readers.read_json_columns`) and checked column by column
(`columns.py`); whenever a file or batch is anything but plainly valid the column path gives up (`NotColumnar`)
and the source streams row by row from the reader (`sources.iter_ir_records`, `iter_raw_sts_pairs`), which
accepts exactly what the row validators accept and names the first bad row. Any other format goes row by row
too. The STS range check is one vectorised pass over the score column. Nothing is written under the final
name unless the whole source is valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from codiemb_pl.data.cache.columns import ir_columns, sts_columns
from codiemb_pl.data.cache.entries import (
    MappedTable,
    cached_entry,
    file_state,
    fingerprint,
    open_arrow,
    read_meta,
    write_arrow,
)
from codiemb_pl.data.readers import DEFAULT_HF_SPLIT, NotColumnar, load_hf_split, read_rows
from codiemb_pl.data.records import IRRecord, STSRecord
from codiemb_pl.data.sources import (
    SourceConfig,
    check_score_in_range,
    detect_format,
    iter_ir_records,
    iter_raw_sts_pairs,
    score_range_of,
    subsample_positions,
)

RECORDS_FILE = "records.arrow"
BATCH_ROWS = 4096
IR_SCHEMA = pa.schema([("query", pa.string()), ("positives", pa.list_(pa.string())),
                       ("negatives", pa.list_(pa.string())), ("positive_text_ids", pa.list_(pa.int64())),
                       ("negative_text_ids", pa.list_(pa.int64())), ("teacher_scores", pa.list_(pa.float64()))])
STS_SCHEMA = pa.schema([("text1", pa.string()), ("text2", pa.string()), ("score", pa.float64()),
                        ("teacher_score", pa.float64())])


def source_fingerprint(cfg: SourceConfig) -> str:
    """The key of a source's records table (see the module docstring); `max_samples`/`seed` are not in it."""
    location, fmt = detect_format(cfg)
    if fmt == "hf" and not Path(location).exists():  # a hub id: the cached dataset's own fingerprint
        state = load_hf_split(location, cfg.split or DEFAULT_HF_SPLIT, cfg.subset)._fingerprint
    else:
        state = file_state(location)
    return fingerprint("records", cfg.task, location, fmt, cfg.split, cfg.subset, cfg.columns, cfg.score_range, state)


def text_id(text: str) -> int:
    """A stable 63-bit hash of a text (identical in every process), for cross-device duplicate checks."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ir_record_batch(queries: list[str], positives: list[list[str]], negatives: list[list[str]],
                     teacher_scores: Optional[list[Optional[list[float]]]] = None) -> pa.RecordBatch:
    return pa.record_batch([
        pa.array(queries, pa.string()), pa.array(positives, pa.list_(pa.string())),
        pa.array(negatives, pa.list_(pa.string())),
        pa.array([[text_id(t) for t in texts] for texts in positives], pa.list_(pa.int64())),
        pa.array([[text_id(t) for t in texts] for texts in negatives], pa.list_(pa.int64())),
        pa.array(teacher_scores or [None] * len(queries), pa.list_(pa.float64())),
    ], schema=IR_SCHEMA)


def _sts_record_batch(text1: list[str], text2: list[str], scores: list[Optional[float]],
                      teacher_scores: Optional[list[Optional[float]]] = None) -> pa.RecordBatch:
    return pa.record_batch([pa.array(text1, pa.string()), pa.array(text2, pa.string()), pa.array(scores, pa.float64()),
                            pa.array(teacher_scores or [None] * len(text1), pa.float64())], schema=STS_SCHEMA)


def _row_batches(cfg: SourceConfig) -> Iterator[pa.RecordBatch]:
    """Record batches from the row-by-row reader (any format; it names the first bad row)."""
    if cfg.task == "ir":
        for chunk in _chunks(iter_ir_records(cfg), BATCH_ROWS):
            yield _ir_record_batch([r.query for r in chunk], [list(r.positives) for r in chunk],
                                   [list(r.negatives) for r in chunk],
                                   [None if r.teacher_scores is None else list(r.teacher_scores) for r in chunk])
    else:
        for chunk in _chunks(iter_raw_sts_pairs(cfg), BATCH_ROWS):
            yield _sts_record_batch([p[1] for p in chunk], [p[2] for p in chunk], [p[3] for p in chunk],
                                    [p[4] for p in chunk])


def _write_rows(cfg: SourceConfig, path: Path) -> int:
    """Write the source's records: column-batched for plainly valid JSON lines, else row by row."""
    schema = IR_SCHEMA if cfg.task == "ir" else STS_SCHEMA
    try:
        if cfg.task == "ir":
            return write_arrow(path, schema, (_ir_record_batch(*columns) for columns in ir_columns(cfg)))
        return write_arrow(path, schema, (_sts_record_batch(*columns) for columns in sts_columns(cfg)))
    except NotColumnar:
        return write_arrow(path, schema, _row_batches(cfg))


def build_records(cfg: SourceConfig, folder: Path) -> dict:
    """Write the source's validated records into `folder`; the entry's meta (rows, score range)."""
    path = folder / RECORDS_FILE
    rows = _write_rows(cfg, path)
    if cfg.task == "ir":
        return {"rows": rows, "task": "ir"}
    scores = open_arrow(path).column("score").to_numpy(zero_copy_only=False).astype(np.float64)  # null: NaN
    gold = scores[~np.isnan(scores)]
    low, high = score_range_of(cfg, float(gold.min()), float(gold.max())) if len(gold) else \
        score_range_of(cfg, 0.0, 1.0)
    outside = np.flatnonzero((scores < low) | (scores > high))
    if len(outside):  # name the first such row as the in-memory loader does: stream to it for its location
        first = int(outside[0])
        for index, (where, _, _, score, _) in enumerate(iter_raw_sts_pairs(cfg)):
            if index == first:
                check_score_in_range(score, low, high, where)
    return {"rows": rows, "task": "sts", "score_range": [low, high]}


@dataclass
class RecordTable:
    """An opened records table and the rows of it this run trains on (`positions`, None = all, in order)."""

    folder: Path
    key: str
    mapped: MappedTable
    meta: dict
    positions: Optional[np.ndarray]
    source: Optional[SourceConfig] = None

    @property
    def table(self) -> pa.Table:
        return self.mapped.table

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else self.meta["rows"]

    def row(self, index: int) -> int:
        """The table row of the run's `index`-th record."""
        return int(self.positions[index]) if self.positions is not None else index

    def normalised_score(self, raw: Optional[float]) -> Optional[float]:
        if raw is None:
            return None
        low, high = self.meta["score_range"]
        return (raw - low) / (high - low)

    def table_rows(self, indices: Iterable[int]) -> np.ndarray:
        """The table rows of the run's `indices`-th records."""
        indices = np.fromiter(indices, dtype=np.int64)
        return indices if self.positions is None else self.positions[indices]

    def json_rows(self, indices: Iterable[int]) -> Iterator[dict]:
        """The run's `indices`-th records as JSON objects the readers read back to the same records, in order:
        IR `{"query", "positives", "negatives"}`, STS `{"text1", "text2", "score"}` (the normalised score), with
        `teacher_scores` / `teacher_score` where the record has them (a pair without a gold score has no `score`).
        Read `BATCH_ROWS` rows at a time, so a subset of any size streams."""
        rows = self.table_rows(indices)
        for start in range(0, len(rows), BATCH_ROWS):
            part = self.table.take(pa.array(rows[start:start + BATCH_ROWS]))
            if self.meta["task"] == "ir":
                for query, positives, negatives, teacher in zip(*(part.column(name).to_pylist() for name in (
                        "query", "positives", "negatives", "teacher_scores"))):
                    row = {"query": query, "positives": positives, "negatives": negatives}
                    yield row if teacher is None else {**row, "teacher_scores": teacher}
            else:
                for text1, text2, score, teacher in zip(*(part.column(name).to_pylist() for name in (
                        "text1", "text2", "score", "teacher_score"))):
                    row = {"text1": text1, "text2": text2}
                    if score is not None:
                        row["score"] = self.normalised_score(score)
                    yield row if teacher is None else {**row, "teacher_score": teacher}

    def record(self, index: int) -> IRRecord | STSRecord:
        """The run's `index`-th record as a record object (for inspection and tests)."""
        row, column = self.row(index), self.mapped.column
        if self.meta["task"] == "ir":
            teacher = column("teacher_scores")[row].as_py()
            return IRRecord(column("query")[row].as_py(), tuple(column("positives")[row].as_py()),
                            tuple(column("negatives")[row].as_py()), None if teacher is None else tuple(teacher))
        return STSRecord(column("text1")[row].as_py(), column("text2")[row].as_py(),
                         self.normalised_score(column("score")[row].as_py()), column("teacher_score")[row].as_py())


def open_records(cfg: SourceConfig, cache_dir: Path, *, rebuild: bool = False, verify: bool = False) -> RecordTable:
    """The source's records table from the cache (built first when missing, stale or damaged; `verify`: check
    the files' CRC-32, see `entries.py`)."""
    key = source_fingerprint(cfg)
    folder, _ = cached_entry(Path(cache_dir) / f"records-{key}", lambda staging: build_records(cfg, staging),
                             rebuild=rebuild, verify=verify)
    meta = read_meta(folder)
    positions = None
    if cfg.seed is not None or cfg.max_samples is not None:
        positions = np.asarray(subsample_positions(meta["rows"], cfg), dtype=np.int64)
    return RecordTable(folder, key, MappedTable(folder / RECORDS_FILE), meta, positions, cfg)


@contextlib.contextmanager
def opened_records(cfg: SourceConfig, cache_dir: Optional[Path] = None) -> Iterator[RecordTable]:
    """The source's records table for a one-off reader (Self Positioning's probe, BOOM's subsets, mining): from
    `cache_dir` (built there once, as training does), or, when None, built in a temporary folder that is removed
    on exit (nothing is left behind)."""
    if cache_dir is not None:
        yield open_records(cfg, Path(cache_dir))
        return
    with tempfile.TemporaryDirectory(prefix="codiemb-records-") as folder:
        yield open_records(cfg, Path(folder))


def record_count(cfg: SourceConfig, cache_dir: Optional[Path] = None) -> int:
    """How many records the source yields (after its `max_samples`), read as `opened_records` reads them."""
    with opened_records(cfg, cache_dir) as records:
        return len(records)


def row_location(cfg: SourceConfig, row: int) -> str:
    """Where row `row` of the source's records table comes from ("file:line", "file: record i"), read again
    from the source (for messages only); a BEIR folder's rows are its judged queries in qrels order."""
    location, fmt = detect_format(cfg)
    if fmt != "beir":
        for index, read in enumerate(read_rows(location, fmt, split=cfg.split, subset=cfg.subset)):
            if index == row:
                return read.where
    return f"{location}: training record {row}"


STATISTICS_ROWS = 65536
"""Rows a start-of-fit statistic reads at once, so that its memory is bounded by this, not by the table's size."""


def _row_slices(records: RecordTable, name: str) -> Iterator[tuple[int, pa.ChunkedArray]]:
    """(first row, column `name` of the next `STATISTICS_ROWS` table rows), over the whole table."""
    column = records.mapped.column(name)
    for start in range(0, len(column), STATISTICS_ROWS):
        yield start, column.slice(start, STATISTICS_ROWS)


def _run_rows(records: RecordTable, start: int, count: int) -> Optional[np.ndarray]:
    """Offsets in `[start, start + count)` of the table rows the run trains on (once per run record), or None
    when the run trains on every row."""
    if records.positions is None:
        return None
    inside = records.positions[(records.positions >= start) & (records.positions < start + count)]
    return inside - start


def _distinct_per_row(lists: pa.ListArray) -> np.ndarray:
    """How many different values each list of `lists` holds: (row, value) pairs sorted, first of each run counted."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    return np.bincount(rows[first], minlength=len(lengths))


def distinct_negative_histogram(records: RecordTable) -> list[int]:
    """`histogram[k]`: how many of the run's IR records have `k` different hard negatives (`len(set(negatives))`,
    texts compared by `text_id`); read `STATISTICS_ROWS` rows at a time. An STS table gives `[]`."""
    histogram = np.zeros(0, dtype=np.int64)
    if records.meta["task"] != "ir":
        return []
    for start, column in _row_slices(records, "negative_text_ids"):
        counts = _distinct_per_row(column.combine_chunks())
        rows = _run_rows(records, start, len(counts))
        part = np.bincount(counts if rows is None else counts[rows])
        histogram = np.pad(histogram, (0, max(0, len(part) - len(histogram))))
        histogram[:len(part)] += part
    return histogram.tolist()


def teacher_score_count(records: RecordTable) -> int:
    """How many of the run's records carry teacher scores (IR `teacher_scores`, STS `teacher_score`)."""
    name = "teacher_scores" if records.meta["task"] == "ir" else "teacher_score"
    if records.positions is None:
        column = records.mapped.column(name)
        return len(column) - column.null_count
    count = 0
    for start, column in _row_slices(records, name):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        count += int(valid[_run_rows(records, start, len(valid))].sum())
    return count
