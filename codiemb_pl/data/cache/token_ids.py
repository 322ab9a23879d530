"""Token ids of a records table's texts, many at once: the tokenizer's backend called directly, the ids
gathered into Arrow list arrays from flat numpy buffers, and row ranges spread over worker processes.

The result is exactly `tokenizer(prefix + text, truncation=True, max_length=L)["input_ids"]` for every text
(texts beyond `text_bound.char_bound(L)` characters are first cut to a piece that gives the same ids):
the backend (`tokenizers.Tokenizer`) is the one `tokenizer(...)` calls, copied after one such call has set
its truncation to `L` (and its side), with the same post-processor (special tokens; a decoder's appended
EOS, `decoder.append_eos_token`) and `split_special_tokens`. The copy is checked against `tokenizer(...)`
on a sample of the texts before use; a tokenizer without a backend (a slow one), or one whose copy
disagrees, is called as `tokenizer(...)` itself, in this process.

Row ranges are spread over worker processes by `tokeniser_pool.py`; this module imports neither torch nor
transformers, so that those processes stay light.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from codiemb_pl.model.text_bound import bound_for_backend, bound_for_tokenizer

TOKEN_LIST = pa.list_(pa.int32())
IR_TOKEN_SCHEMA = pa.schema([("query", TOKEN_LIST), ("positives", pa.list_(TOKEN_LIST)),
                             ("negatives", pa.list_(TOKEN_LIST))])
STS_TOKEN_SCHEMA = pa.schema([("text1", TOKEN_LIST), ("text2", TOKEN_LIST)])
CHECK_ROWS = 64
"""Rows of the table (all their texts) compared with `tokenizer(...)` before the backend copy is used."""

Encode = Callable[[list[str], int], pa.Array]
"""(texts, max_length) -> list<int32> array of their token ids."""


@dataclass(frozen=True)
class TokenLimits:
    """Maximum token counts actually applied (configured limits, already capped by the model's maximum)."""

    query: int
    passage: int
    sts: int


ENCODE_TEXTS = 2048
"""Texts encoded per backend call: their ids are Python lists (~36 bytes an id) until gathered into numpy."""


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated values) of Python id lists, as int32 numpy arrays."""
    lengths = np.fromiter(map(len, ids), np.int32, len(ids))
    return lengths, np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))


def _list_array(parts: list[tuple[np.ndarray, np.ndarray]]) -> pa.ListArray:
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def list_array(ids: list[list[int]]) -> pa.ListArray:
    """A list<int32> array from Python id lists, through one flat numpy buffer and offsets."""
    return _list_array([_flat(ids)])


def text_token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The definition: `tokenizer(texts, truncation=True, max_length=L)["input_ids"]` (texts beyond
    `text_bound.char_bound(L)` characters are cut first, to the same ids)."""
    texts = bound_for_tokenizer(tokenizer, texts, max_length)
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []


def reference_encoder(tokenizer) -> Encode:
    """`Encode` by the definition, `text_token_ids`."""
    def encode(texts: list[str], max_length: int) -> pa.Array:
        return list_array(text_token_ids(tokenizer, texts, max_length))
    return encode


@dataclass(frozen=True)
class BackendSpec:
    """What rebuilds the backend as `tokenizer(..., truncation=True, max_length=L)` leaves it, for each L."""

    pipelines: dict[int, str]  # max_length -> the backend's JSON with that truncation set
    split_special_tokens: bool


def backend_spec(tokenizer, lengths: set[int]) -> Optional[BackendSpec]:
    """The spec of a fast tokenizer's backend, or None (no backend: use `reference_encoder`)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None or not hasattr(backend, "to_str"):
        return None
    pipelines = {}
    for length in sorted(lengths):
        tokenizer(["a"], truncation=True, max_length=length)  # sets the backend's truncation as every call does
        pipelines[length] = backend.to_str()
    return BackendSpec(pipelines, bool(getattr(backend, "encode_special_tokens", False)))


def backend_encoder(spec: BackendSpec) -> Encode:
    """`Encode` through copies of the backend (one per length), with `encode_batch_fast` (no offsets) when present."""
    from tokenizers import Tokenizer

    backends = {}
    for length, pipeline in spec.pipelines.items():
        backends[length] = Tokenizer.from_str(pipeline)
        if hasattr(backends[length], "encode_special_tokens"):
            backends[length].encode_special_tokens = spec.split_special_tokens

    def encode(texts: list[str], max_length: int) -> pa.Array:
        backend = backends[max_length]
        texts = bound_for_backend(backend, texts, max_length)
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return _list_array([_flat([encoding.ids for encoding in batch(texts[start:start + ENCODE_TEXTS],
                                                                      add_special_tokens=True)])
                            for start in range(0, len(texts), ENCODE_TEXTS)])
    return encode


def _nested(encode: Encode, column: pa.ListArray, max_length: int) -> pa.ListArray:
    """Token ids of every text of a list<string> column, in the same lists."""
    offsets = np.asarray(column.offsets, np.int64)
    offsets = (offsets - offsets[0]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), encode(column.flatten().to_pylist(), max_length))


def _prefixed(prefix: str, column: pa.Array) -> list[str]:
    return [prefix + text for text in column.to_pylist()]


def token_batch(encode: Encode, batch: pa.RecordBatch | pa.Table, task: str, limits: TokenLimits,
                prefix: str) -> pa.RecordBatch:
    """The token columns of a slice of a records table (IR: prefixed query, positives, negatives; STS: both
    prefixed sentences)."""
    column = (lambda name: batch.column(name).combine_chunks()) if isinstance(batch, pa.Table) else batch.column
    if task == "ir":
        return pa.record_batch([encode(_prefixed(prefix, column("query")), limits.query),
                                _nested(encode, column("positives"), limits.passage),
                                _nested(encode, column("negatives"), limits.passage)], schema=IR_TOKEN_SCHEMA)
    return pa.record_batch([encode(_prefixed(prefix, column("text1")), limits.sts),
                            encode(_prefixed(prefix, column("text2")), limits.sts)], schema=STS_TOKEN_SCHEMA)


def lengths_of(task: str, limits: TokenLimits) -> set[int]:
    return {limits.query, limits.passage} if task == "ir" else {limits.sts}


def choose_encoder(tokenizer, sample: pa.RecordBatch | pa.Table, task: str, limits: TokenLimits,
                   prefix: str) -> tuple[Encode, Optional[BackendSpec]]:
    """The backend encoder when it gives `tokenizer(...)`'s ids on `sample`, else the reference one."""
    reference = reference_encoder(tokenizer)
    spec = backend_spec(tokenizer, lengths_of(task, limits))
    if spec is None:
        return reference, None
    fast = backend_encoder(spec)
    if not token_batch(fast, sample, task, limits, prefix).equals(token_batch(reference, sample, task, limits, prefix)):
        return reference, None
    return fast, spec
