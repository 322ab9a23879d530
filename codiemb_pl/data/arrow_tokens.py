"""Token ids of a records table, computed once per (records, tokenizer, maximum lengths, prefix) and cached.

Each text is stored exactly as the collate used to tokenise it: `tokenizer(prefix + text, truncation=True,
max_length=L)["input_ids"]` (special tokens included), with the source's instruction prefix on queries
(IR) and on both sentences (STS), none on passages. The collate then only selects, pads and masks.

IR table: `query` (list<int32>), `positives`, `negatives` (list<list<int32>>, aligned with the records
table's lists). STS table: `text1`, `text2` (list<int32>). `meta.json` holds `prefix_tokens`, the
prefix's own token count that the pooling mask leaves out (`tokenize.prefix_pooling_mask`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .arrow_records import RecordTable
from .cache import MappedTable, cached_entry, fingerprint, read_meta, write_arrow
from .tokenize import prefix_token_count

TOKENS_FILE = "tokens.arrow"
TOKEN_LIST = pa.list_(pa.int32())
IR_TOKEN_SCHEMA = pa.schema([("query", TOKEN_LIST), ("positives", pa.list_(TOKEN_LIST)),
                             ("negatives", pa.list_(TOKEN_LIST))])
STS_TOKEN_SCHEMA = pa.schema([("text1", TOKEN_LIST), ("text2", TOKEN_LIST)])


@dataclass(frozen=True)
class TokenLimits:
    """Maximum token counts actually applied (configured limits, already capped by the model's maximum)."""

    query: int
    passage: int
    sts: int


def tokenizer_fingerprint(tokenizer) -> str:
    """What fixes a tokenizer's output: its class, full serialised pipeline (or vocabulary), padding side."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the per-call truncation/padding state that every call rewrites
        spec = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(spec.encode("utf-8")).hexdigest()
    return fingerprint("tokenizer", type(tokenizer).__name__, digest, tokenizer.padding_side,
                       list(tokenizer.model_input_names), tokenizer.pad_token_id)


def _token_ids(tokenizer, texts: list[str], max_length: int) -> pa.Array:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    return pa.array(encoded, TOKEN_LIST)


def _nested(tokenizer, column: pa.ListArray, max_length: int) -> pa.ListArray:
    """Token ids of every text of a list<string> column, in the same lists."""
    offsets = column.offsets
    if len(offsets) and offsets[0].as_py() != 0:
        offsets = pa.array([value - offsets[0].as_py() for value in offsets.to_pylist()], pa.int32())
    return pa.ListArray.from_arrays(offsets, _token_ids(tokenizer, column.flatten().to_pylist(), max_length))


def _prefixed(prefix: str, column: pa.Array) -> list[str]:
    return [prefix + text for text in column.to_pylist()]


def _token_batches(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str) -> Iterator[pa.RecordBatch]:
    task = records.meta["task"]
    for batch in records.table.to_batches():
        if task == "ir":
            yield pa.record_batch([
                _token_ids(tokenizer, _prefixed(prefix, batch.column("query")), limits.query),
                _nested(tokenizer, batch.column("positives"), limits.passage),
                _nested(tokenizer, batch.column("negatives"), limits.passage)], schema=IR_TOKEN_SCHEMA)
        else:
            yield pa.record_batch([_token_ids(tokenizer, _prefixed(prefix, batch.column("text1")), limits.sts),
                                   _token_ids(tokenizer, _prefixed(prefix, batch.column("text2")), limits.sts)],
                                  schema=STS_TOKEN_SCHEMA)


def build_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, folder: Path) -> dict:
    schema = IR_TOKEN_SCHEMA if records.meta["task"] == "ir" else STS_TOKEN_SCHEMA
    rows = write_arrow(folder / TOKENS_FILE, schema, _token_batches(records, tokenizer, limits, prefix))
    return {"rows": rows, "prefix_tokens": prefix_token_count(tokenizer, prefix), "records": records.key}


def open_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, cache_dir: Path, *,
                rebuild: bool = False) -> tuple[MappedTable, dict]:
    """The token table of `records` (row-aligned with it) and its meta, from the cache (built when missing)."""
    key = fingerprint("tokens", records.key, tokenizer_fingerprint(tokenizer), limits.query, limits.passage,
                      limits.sts, prefix)
    folder, _ = cached_entry(Path(cache_dir) / f"tokens-{key}",
                             lambda staging: build_tokens(records, tokenizer, limits, prefix, staging), rebuild=rebuild)
    return MappedTable(folder / TOKENS_FILE), read_meta(folder)
