"""File-format layer: read a jsonl/json, csv, tsv or parquet file, or a Hugging Face dataset, into
rows of plain dicts, each tagged with where it came from (`"file.jsonl:17"`, `"file.parquet: record 3"`).

Readers know nothing about tasks or column meanings; `sources.py` maps columns onto records.
Text-file locations use 1-based line numbers; parquet and Hugging Face locations use the 0-based
record index (what `df.iloc[i]` / `dataset[i]` take).

JSON lines have one reader with two speeds: `read_json_columns` parses blocks of lines into Arrow columns
(`pyarrow.json`, what the training-data cache builds from) and raises `NotColumnar` on anything it is not
sure of; its fallback, `read_json_records`, goes row by row and names the first bad line.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from codiemb_pl.errors import InputError

if TYPE_CHECKING:  # pyarrow is imported where it is used
    import pyarrow as pa

EXTENSION_FORMATS: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
                                     ".parquet": "parquet"}
FILE_FORMATS = ("jsonl", "csv", "tsv", "parquet")
# Formats whose cells are always strings: list-valued fields arrive JSON-encoded (`["a", "b"]`).
TEXT_CELL_FORMATS = frozenset({"csv", "tsv"})
DEFAULT_HF_SPLIT = "train"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Row:
    """One record as read from its source: `where` names file and line (or record index)."""

    where: str
    values: dict[str, Any]


def format_from_extension(path: str | Path) -> str | None:
    """The file format implied by the file name's extension, or None when it implies none."""
    return EXTENSION_FORMATS.get(Path(path).suffix.lower())


def looks_like_hub_id(location: str) -> bool:
    """True for `owner/name` strings that are not names of data files (`data/train.jsonl` is not)."""
    return bool(_HUB_ID.match(location)) and format_from_extension(location) is None


def read_rows(location: str, fmt: str, *, split: str | None = None, subset: str | None = None) -> Iterator[Row]:
    """Rows of `location` read as `fmt` (one of FILE_FORMATS or "hf"); `split`/`subset` are for "hf"."""
    if fmt == "hf":
        return read_hf_dataset(location, split=split, subset=subset)
    path = Path(location)
    if not path.is_file():
        raise InputError(location, f"no such file (format {fmt!r} reads one file)",
                         "check the path, or set format: hf / beir for a dataset folder")
    if fmt == "jsonl":
        return read_json_records(path)
    if fmt == "csv":
        return read_delimited(path, delimiter=",")
    if fmt == "tsv":
        return read_delimited(path, delimiter="\t")
    if fmt == "parquet":
        return read_parquet(path)
    raise InputError(location, f"unknown file format {fmt!r}", f"use one of {', '.join(FILE_FORMATS)} or hf")


def read_json_records(path: Path) -> Iterator[Row]:
    """JSON lines (one object per line, blank lines skipped); a `.json` file holding one array also works."""
    if starts_with_array(path):
        yield from _read_json_array(path)
        return
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as exc:
                raise not_utf8(where, exc) from exc
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(where, f"malformed JSON ({exc.msg} at column {exc.colno})",
                                 "each line must hold one complete JSON object") from exc
            yield Row(where, _require_object(value, where))


def not_utf8(where: str, error: UnicodeDecodeError) -> InputError:
    """The one line for undecodable bytes at `where` (`"file:line"`, or the file when no line is known)."""
    return InputError(where, f"line is not valid UTF-8 ({error.reason})", "save the file as UTF-8")


def first_invalid_utf8_line(path: str | Path) -> Optional[int]:
    """The 1-based number of the first line of `path` that is not valid UTF-8, or None.

    Lines are split at b"\\n", which never occurs inside a multi-byte UTF-8 sequence, so decoding line by line
    decides exactly as decoding the whole file. Readers that decode through a text stream (csv, a whole-file
    read) call this only after the stream has failed, to name the line.
    """
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_number
    return None


def utf8_error(path: str | Path, error: UnicodeDecodeError) -> InputError:
    """`not_utf8` for a file a text stream failed to decode, naming its first bad line."""
    line_number = first_invalid_utf8_line(path)
    return not_utf8(f"{path}:{line_number}" if line_number else str(path), error)


def starts_with_array(path: Path) -> bool:
    """Whether a JSON file holds one array (`[...]`) rather than one object per line."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _read_json_array(path: Path) -> Iterator[Row]:
    try:
        values = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}", f"malformed JSON ({exc})",
                         "fix the file, or write one JSON object per line") from exc
    for index, value in enumerate(values):
        where = f"{path}: record {index}"
        yield Row(where, _require_object(value, where))


def _require_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(where, f"expected a JSON object, got {type(value).__name__}",
                         'write each record as {"field": value, ...}')
    return value


JSON_BLOCK_BYTES = 1 << 20
"""Bytes of JSON parsed per column batch. Measured on 100k IR records (357 MB): 8 MB blocks held ~320 MB of
Arrow memory at the peak of the cache build, 1 MB blocks ~40 MB, and built faster (16 s against 20 s)."""


class NotColumnar(Exception):
    """This file (or batch) needs the row-by-row reader (`read_json_records`), which decides whether it is valid."""


def read_json_columns(path: Path, block_bytes: int = JSON_BLOCK_BYTES) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(column names, record batches) of a JSON-lines file, parsed `block_bytes` at a time by `pyarrow.json`.

    Raises `NotColumnar` (now or while iterating) whenever the file is anything but plainly readable: a JSON
    array file, a parse error, a string that is not valid UTF-8, a type that changes between blocks, no rows.
    The caller then reads the file with `read_json_records`, which names the first bad line; so this path never
    decides what is an error, it only reads valid files faster.
    """
    import pyarrow as pa
    import pyarrow.json as pj

    if starts_with_array(path):
        raise NotColumnar("a JSON array")
    try:
        reader = pj.open_json(str(path), read_options=pj.ReadOptions(block_size=block_bytes, use_threads=False))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise NotColumnar(str(error)) from error

    def batches() -> Iterator[pa.RecordBatch]:
        rows = 0
        try:
            for batch in reader:
                batch.validate(full=True)  # pyarrow.json keeps undecodable bytes in strings: the row reader names them
                rows += batch.num_rows
                yield batch
        except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
            raise NotColumnar(str(error)) from error
        if rows == 0:
            raise NotColumnar("no rows")
    return reader.schema.names, batches()


def read_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    """CSV (`delimiter=","`, standard quoting) or TSV (`"\\t"`, no quoting: quotes are plain characters).

    The first line is the header. A row whose field count differs from the header's is an error.
    """
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
            if not reader.fieldnames:
                return
            header_size = len(reader.fieldnames)
            for values in reader:
                where = f"{path}:{reader.line_num}"
                extra = values.pop(None, None)  # cells beyond the header
                missing = sum(value is None for value in values.values())
                if extra or missing:
                    size = header_size + len(extra or ()) - missing
                    raise InputError(where, f"row has {size} fields but the header has {header_size}",
                                     "quote cells that contain the delimiter (CSV) or remove stray tabs (TSV)")
                yield Row(where, values)
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from exc
    except csv.Error as exc:
        raise InputError(str(path), f"unreadable {('CSV' if delimiter == ',' else 'TSV')} ({exc})",
                         "check quoting and line endings") from exc


def read_parquet(path: Path) -> Iterator[Row]:
    """Rows of a parquet file; list columns arrive as Python lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(str(path), f"unreadable parquet file ({exc})", "check that it is a parquet file") from exc
    for index, values in enumerate(table.to_pylist()):
        yield Row(f"{path}: record {index}", values)


def read_hf_dataset(location: str, *, split: str | None = None, subset: str | None = None) -> Iterator[Row]:
    """Rows of one split of a Hugging Face dataset: a hub id, a local dataset folder or script, or a
    folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    split = split or DEFAULT_HF_SPLIT
    dataset = load_hf_split(location, split, subset)
    where_prefix = f"{location}[{split}]"
    for index, values in enumerate(dataset):
        yield Row(f"{where_prefix}: record {index}", dict(values))


def load_hf_split(location: str, split: str, subset: str | None) -> Any:
    """One split of a Hugging Face dataset (`datasets.Dataset`): saved to disk, a local folder or script, or a hub id."""
    import datasets

    path = Path(location)
    if _is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(location, f"split {split!r} not found; the dataset has {sorted(loaded)}",
                                 "set split: to one of them")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(location, name=subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise InputError(location, f"could not load Hugging Face dataset (subset={subset!r}, split={split!r}): {exc}",
                         "check the hub id or local folder, the subset (name) and the split") from exc


def _is_saved_to_disk(path: Path) -> bool:
    """True for folders written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / marker).is_file()
                                 for marker in ("state.json", "dataset_dict.json"))
