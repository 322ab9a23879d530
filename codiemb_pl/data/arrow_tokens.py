"""Token ids of a records table, computed once per (records, tokenizer, maximum lengths, prefix) and cached.

Each text is stored exactly as the collate used to tokenise it: `tokenizer(prefix + text, truncation=True,
max_length=L)["input_ids"]` (special tokens included), with the source's instruction prefix on queries
(IR) and on both sentences (STS), none on passages. The collate then only selects, pads and masks.

IR table: `query` (list<int32>), `positives`, `negatives` (list<list<int32>>, aligned with the records
table's lists). STS table: `text1`, `text2` (list<int32>). `meta.json` holds `prefix_tokens`, the
prefix's own token count that the pooling mask leaves out (`tokenize.prefix_pooling_mask`). The ids are
computed in batches by the tokenizer's backend, over several processes (`token_ids.py`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .arrow_records import RecordTable
from .cache import MappedTable, cached_entry, fingerprint, read_meta, write_arrow
from .token_ids import IR_TOKEN_SCHEMA, STS_TOKEN_SCHEMA, TokenLimits, token_batches
from .tokenize import prefix_token_count

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


def build_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, folder: Path) -> dict:
    schema = IR_TOKEN_SCHEMA if records.meta["task"] == "ir" else STS_TOKEN_SCHEMA
    batches = token_batches(tokenizer, records.mapped.path, records.table, records.meta["task"], limits, prefix)
    rows = write_arrow(folder / TOKENS_FILE, schema, batches)
    return {"rows": rows, "prefix_tokens": prefix_token_count(tokenizer, prefix), "records": records.key}


def open_tokens(records: RecordTable, tokenizer, limits: TokenLimits, prefix: str, cache_dir: Path, *,
                rebuild: bool = False) -> tuple[MappedTable, dict]:
    """The token table of `records` (row-aligned with it) and its meta, from the cache (built when missing)."""
    key = fingerprint("tokens", records.key, tokenizer_fingerprint(tokenizer), limits.query, limits.passage,
                      limits.sts, prefix)
    folder, _ = cached_entry(Path(cache_dir) / f"tokens-{key}",
                             lambda staging: build_tokens(records, tokenizer, limits, prefix, staging), rebuild=rebuild)
    return MappedTable(folder / TOKENS_FILE), read_meta(folder)
