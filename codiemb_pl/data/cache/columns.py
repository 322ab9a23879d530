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


def _is_number_type(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _finite(values: list) -> bool:
    return all(abs(value) < float("inf") for value in values)  # NaN and infinities fail this


def _teacher_score_lists(array: Optional[pa.Array], positives: list[list[str]], negatives: list[list[str]]
                         ) -> list[Optional[list[float]]]:
    """`teacher_scores` per row: null (none), or one finite number per positive and negative."""
    if array is None or pa.types.is_null(array.type):
        return [None] * len(positives)
    if not (pa.types.is_list(array.type) and _is_number_type(array.type.value_type)):
        raise NotColumnar("teacher_scores not lists of numbers")
    rows = array.to_pylist()
    for scores, pos, neg in zip(rows, positives, negatives):
        if scores is not None and (len(scores) != len(pos) + len(neg) or None in scores or not _finite(scores)):
            raise NotColumnar("teacher_scores do not fit")
    return [None if scores is None else [float(score) for score in scores] for scores in rows]


def ir_columns(cfg: SourceConfig) -> Iterator[tuple[list[str], list[list[str]], list[list[str]],
                                                    list[Optional[list[float]]]]]:
    """(queries, positives, negatives, teacher scores) of each block of an IR JSON-lines source, all valid, or
    `NotColumnar`."""
    for fields, batch in _json_batches(cfg, IR_FIELD_ALIASES, ("query", "positives")):
        column = (lambda field: batch.column(fields[field]) if fields[field] else None)
        positives = _text_lists(column("positives"), batch.num_rows, True)
        negatives = _text_lists(column("negatives"), batch.num_rows, False)
        yield (_texts(column("query")), positives, negatives,
               _teacher_score_lists(column("teacher_scores"), positives, negatives))


def sts_columns(cfg: SourceConfig) -> Iterator[tuple[list[str], list[str], list[Optional[float]],
                                                     list[Optional[float]]]]:
    """(text1, text2, raw scores, teacher scores) of each block of an STS JSON-lines source, all valid, or
    `NotColumnar`. A null score is valid only beside a teacher score (in [0, 1])."""
    for fields, batch in _json_batches(cfg, STS_FIELD_ALIASES, ("text1", "text2", "score")):
        scores = batch.column(fields["score"])
        if not _is_number_type(scores.type):
            raise NotColumnar("non-numeric score")
        teacher = [None] * batch.num_rows
        if fields["teacher_score"] is not None and not pa.types.is_null(batch.column(fields["teacher_score"]).type):
            column = batch.column(fields["teacher_score"])
            if not _is_number_type(column.type):
                raise NotColumnar("non-numeric teacher score")
            teacher = [None if value is None else float(value) for value in column.to_pylist()]
            if not all(value is None or 0.0 <= value <= 1.0 for value in teacher):  # NaN fails this too
                raise NotColumnar("teacher score outside [0, 1]")
        values = [None if score is None else float(score) for score in scores.to_pylist()]
        if any(score is None and mentor is None for score, mentor in zip(values, teacher)):
            raise NotColumnar("no score")
        if not _finite([score for score in values if score is not None]):
            raise NotColumnar("non-finite score")
        yield _texts(batch.column(fields["text1"])), _texts(batch.column(fields["text2"])), values, teacher
