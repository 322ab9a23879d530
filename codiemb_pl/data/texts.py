"""A file of texts to embed (`codiemb predict`): one text per line of a `.txt` file, or one column of a
jsonl/json, csv, tsv or parquet file. Row i of the output embeddings is text i of the file.

Every text must be non-empty: an empty line or cell is an error naming its line (a skipped line would
shift every later row of the output against the input).
"""

from __future__ import annotations

from pathlib import Path

from codiemb_pl.data.readers import EXTENSION_FORMATS, format_from_extension, read_rows, utf8_error
from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location

TEXT_EXTENSIONS = (".txt",)


def read_texts(path: str, column: str = "text") -> list[str]:
    """The texts of `path`, in file order; `column` names the text column of a table / JSON-lines file."""
    location = resolve_location(path)
    file = Path(location)
    if not file.is_file():
        raise InputError(location, "no such file", "give a .txt file (one text per line) or a jsonl/csv/tsv/parquet file")
    if file.suffix.lower() in TEXT_EXTENSIONS:
        texts = _read_lines(file)
    else:
        fmt = format_from_extension(file)
        if fmt is None:
            raise InputError(location, f"cannot tell the format from the extension {file.suffix!r}",
                             f"use .txt or one of {sorted(EXTENSION_FORMATS)}")
        texts = []
        for row in read_rows(location, fmt):
            if column not in row.values:
                raise InputError(row.where, f"no column {column!r}",
                                 f"available columns: {sorted(row.values)}; choose one with --data.predict_column")
            value = row.values[column]
            if not isinstance(value, str):
                raise InputError(row.where, f"column {column!r} holds {type(value).__name__}, not a text",
                                 "give every row a text")
            texts.append(_non_empty(value, row.where))
    if not texts:
        raise InputError(location, "holds no texts", "give at least one text to embed")
    return texts


def _read_lines(file: Path) -> list[str]:
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise utf8_error(file, exc) from exc
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    return [_non_empty(line.rstrip("\r"), f"{file}:{number}") for number, line in enumerate(lines, start=1)]


def _non_empty(text: str, where: str) -> str:
    if not text.strip():
        raise InputError(where, "empty text", "remove the line or fill in the text; row i of the output is text i")
    return text
