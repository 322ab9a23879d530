"""Token ids of a records table, computed once per (records, tokenizer, maximum lengths, prefix) and cached.

Each text is stored exactly as the collate used to tokenise it: `tokenizer(prefix + text, truncation=True,
max_length=L)["input_ids"]` (special tokens included), with the source's instruction prefix on queries
(IR) and on both sentences (STS), none on passages. The collate then only selects, pads and masks.

IR table: `query` (list<int32>), `positives`, `negatives` (list<list<int32>>, aligned with the records
table's lists). STS table: `text1`, `text2` (list<int32>). `meta.json` holds `prefix_tokens`, the
prefix's own token count that the pooling mask leaves out (`model.pooling.prefix_pooling_mask`). The ids are
computed in batches by the tokenizer's backend (`token_ids.py`), over several processes (`tokeniser_pool.py`).
Texts longer than `text_bound.char_bound(L)` characters are cut before tokenisation (same ids); a build that meets any says so
once per source: how many, and the file and line of the first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from codiemb_pl.data.cache.entries import MappedTable, cached_entry, fingerprint, open_arrow, read_meta, write_arrow
from codiemb_pl.data.cache.records import RecordTable, row_location
from codiemb_pl.data.cache.token_ids import IR_TOKEN_SCHEMA, STS_TOKEN_SCHEMA, TokenLimits
from codiemb_pl.data.cache.tokeniser_pool import token_batches
from codiemb_pl.model.pooling import prefix_token_count
from codiemb_pl.model.text_bound import char_bound

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.arrow"


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


def long_texts(records: RecordTable, limits: TokenLimits, prefix: str) -> tuple[int, Optional[tuple[int, str]]]:
    """How many texts of the table exceed `text_bound.char_bound` of their token limit (prefix included), and
    the (row, field) of the first one."""
    import pyarrow.compute as pc

    if records.meta["task"] == "ir":
        fields = [("query", limits.query, len(prefix)), ("positives", limits.passage, 0),
                  ("negatives", limits.passage, 0)]
    else:
        fields = [("text1", limits.sts, len(prefix)), ("text2", limits.sts, len(prefix))]
    count, first = 0, None
    table = open_arrow(records.mapped.path)  # a map of its own: the texts' pages leave this process with it
    for name, limit, extra in fields:
        start = 0
        for chunk in table.column(name).chunks:
            is_list = pa.types.is_list(chunk.type)
            lengths = pc.utf8_length(chunk.flatten() if is_list else chunk).to_numpy(zero_copy_only=False)
            hits = np.flatnonzero(lengths + extra > char_bound(limit))
            if len(hits):
                rows = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)[hits] if is_list else hits
                count += len(hits)
                if first is None or start + int(rows[0]) < first[0]:
                    first = (start + int(rows[0]), name)
            start += len(chunk)
    return count, first


def warn_long_texts(records: RecordTable, limits: TokenLimits, prefix: str) -> None:
    """One warning for a source whose texts are cut before tokenisation (how many, where the first is)."""
    count, first = long_texts(records, limits, prefix)
    if not count:
        return
    name = records.source.name if records.source is not None else records.key
    where = row_location(records.source, first[0]) if records.source is not None else f"row {first[0]}"
    logger.warning(f"[codiemb] source {name!r}: {count} text(s) longer than their token limit can use "
                   f"({_bounds(records.meta['task'], limits)}) were cut before tokenisation (the first: {where}, "
                   f"{first[1]}); the token ids are those of the whole texts")


def _bounds(task: str, limits: TokenLimits) -> str:
    if task == "ir":
        return f"queries > {char_bound(limits.query)}, passages > {char_bound(limits.passage)} characters"
    return f"> {char_bound(limits.sts)} characters"


def build_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, folder: Path) -> dict:
    warn_long_texts(records, limits, prefix)
    schema = IR_TOKEN_SCHEMA if records.meta["task"] == "ir" else STS_TOKEN_SCHEMA
    batches = token_batches(tokenizer, records.mapped.path, records.table, records.meta["task"], limits, prefix)
    rows = write_arrow(folder / TOKENS_FILE, schema, batches)
    return {"rows": rows, "prefix_tokens": prefix_token_count(tokenizer, prefix), "records": records.key}


def open_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, cache_dir: Path, *,
                rebuild: bool = False, verify: bool = False) -> tuple[MappedTable, dict]:
    """The token table of `records` (row-aligned with it) and its meta, from the cache (built when missing)."""
    key = fingerprint("tokens", records.key, tokenizer_fingerprint(tokenizer), limits.query, limits.passage,
                      limits.sts, prefix)
    folder, _ = cached_entry(Path(cache_dir) / f"tokens-{key}",
                             lambda staging: build_tokens(records, tokenizer, limits, prefix, staging), rebuild=rebuild,
                             verify=verify)
    return MappedTable(folder / TOKENS_FILE), read_meta(folder)
