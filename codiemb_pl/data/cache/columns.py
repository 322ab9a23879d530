"""A JSON-lines training source's blocks (`readers.read_json_columns`) checked column by column as record fields:
the fast path of the records table's build (`records.py`).

The checks are conservative: whenever a batch is anything but plainly valid (an unexpected type, two alias
columns for one field, a missing, null or blank text, a non-numeric or non-finite score) they raise
`NotColumnar`, and the caller reads the source row by row instead (`sources.iter_ir_records`,
`iter_raw_sts_pairs`), which accepts exactly what the row validators accept and names the first bad row with
their message. So this path never decides what is an error; it only speeds up valid files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pyarrow as pa

from codiemb_pl.data.readers import NotColumnar, read_json_columns
from codiemb_pl.data.sources import IR_FIELD_ALIASES, STS_FIELD_ALIASES, SourceConfig, column_candidates, detect_format


def _column_of(field: str, aliases: dict, columns: Optional[dict], names: list[str], required: bool) -> Optional[str]:
    present = [name for name in column_candidates(field, aliases, columns) if name in names]
    if len(present) > 1 or (required and not present):  # rows may pick different aliases / miss the field
        raise NotColumnar(field)
    return present[0] if present else None


def _json_batches(cfg: SourceConfig, aliases: dict, required: tuple[str, ...]
                  ) -> Iterator[tuple[dict[str, Optional[str]], pa.RecordBatch]]:
    """(our field -> its column, batch) of every block of a JSON-lines source, or `NotColumnar`."""
    location, fmt = detect_format(cfg)
    if fmt != "jsonl":
        raise NotColumnar("not JSON lines")
    names, batches = read_json_columns(Path(location))
    fields = {field: _column_of(field, aliases, cfg.columns, names, field in required) for field in aliases}
    for batch in batches:
        yield fields, batch


def _texts(array: pa.Array) -> list[str]:
    """A string column whose every value is a non-blank text (as `sources._single_text` requires)."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) or array.null_count:
        raise NotColumnar("not all texts")
    values = array.to_pylist()
    if not all(value.strip() for value in values):
        raise NotColumnar("blank text")
    return values


def _text_lists(array: Optional[pa.Array], rows: int, required: bool) -> list[list[str]]:
    """A text or list-of-texts column as lists (`sources._text_list`): a blank or null text gives [] (an
    error when `required`); a list must hold non-blank texts only."""
    if array is None or pa.types.is_null(array.type):
        if required:
            raise NotColumnar("no texts")
        return [[] for _ in range(rows)]
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        lists = [[value] if value is not None and value.strip() else [] for value in array.to_pylist()]
    elif pa.types.is_list(array.type) and pa.types.is_string(array.type.value_type):
        lists = [value if value is not None else [] for value in array.to_pylist()]
        if not all(item is not None and item.strip() for value in lists for item in value):
            raise NotColumnar("blank or null text in a list")
    else:
        raise NotColumnar("neither text nor list of texts")
    if required and not all(lists):
        raise NotColumnar("empty list")
    return lists


def ir_columns(cfg: SourceConfig) -> Iterator[tuple[list[str], list[list[str]], list[list[str]]]]:
    """(queries, positives, negatives) of each block of an IR JSON-lines source, all valid, or `NotColumnar`."""
    for fields, batch in _json_batches(cfg, IR_FIELD_ALIASES, ("query", "positives")):
        column = (lambda field: batch.column(fields[field]) if fields[field] else None)
        yield (_texts(column("query")), _text_lists(column("positives"), batch.num_rows, True),
               _text_lists(column("negatives"), batch.num_rows, False))


def sts_columns(cfg: SourceConfig) -> Iterator[tuple[list[str], list[str], list[float]]]:
    """(text1, text2, raw scores) of each block of an STS JSON-lines source, all valid, or `NotColumnar`."""
    for fields, batch in _json_batches(cfg, STS_FIELD_ALIASES, ("text1", "text2", "score")):
        scores = batch.column(fields["score"])
        if not (pa.types.is_integer(scores.type) or pa.types.is_floating(scores.type)) or scores.null_count:
            raise NotColumnar("non-numeric score")
        values = [float(score) for score in scores.to_pylist()]
        if not all(abs(score) < float("inf") for score in values):  # NaN and infinities fail this
            raise NotColumnar("non-finite score")
        yield _texts(batch.column(fields["text1"])), _texts(batch.column(fields["text2"])), values
