"""Damaged training-cache entries (`data/cache.py`) are found when opened and rebuilt with one warning naming
the entry, never opened (a traceback, or a silently wrong batch): truncated, garbled or missing Arrow files,
a garbled or edited `meta.json`, a flipped byte (found by CRC-32 when the file's mtime changed, or with
`verify=True`). Two processes meeting one damaged entry rebuild it once. A read-only cache folder that must
be (re)built is one line."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from codiemb_pl.data.cache.entries import BUILD_LOG, META_FILE, cached_entry, entry_problem, write_arrow
from codiemb_pl.errors import InputError

IR_ROWS = [{"query": f"question {i}", "positives": [f"answer {i}"], "negatives": [f"wrong {i}"]} for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from conftest import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def write_source(tmp_path: Path) -> Path:
    path = tmp_path / "ir.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in IR_ROWS))
    return path


def open_both(path: Path, cache: Path, tokenizer, verify: bool = False):
    """(records entry, tokens entry, every record, every token row) opened from the cache."""
    from codiemb_pl.data.cache.records import open_records
    from codiemb_pl.data.cache.tokens import TokenLimits, open_tokens
    from codiemb_pl.data.sources import SourceConfig

    records = open_records(SourceConfig(name="ir", task="ir", path=str(path)), cache, verify=verify)
    tokens, _ = open_tokens(records, tokenizer, TokenLimits(16, 16, 16), "", cache, verify=verify)
    token_rows = tokens.table.to_pylist()
    return records.folder, tokens.path.parent, [records.record(i) for i in range(len(records))], token_rows


def flip_byte(path: Path, keep_mtime: bool) -> None:
    """Flip one byte in the middle of the file: inside a data buffer, past every header."""
    state = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(state.st_atime_ns, state.st_mtime_ns))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_footer(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40:-6] = b"\x00" * 34
    path.write_bytes(bytes(data))


def edit_meta(entry: Path) -> None:
    meta = json.loads((entry / META_FILE).read_text())
    meta["rows"] = meta["rows"] + 1
    (entry / META_FILE).write_text(json.dumps(meta))


DAMAGE = {
    "truncated_file": (lambda entry, name: truncate(entry / name), "bytes"),
    "garbled_footer": (lambda entry, name: garble_footer(entry / name), "cannot be read"),
    "missing_file": (lambda entry, name: (entry / name).unlink(), "is missing"),
    "garbled_meta": (lambda entry, name: (entry / META_FILE).write_text('{"rows": 3'), "missing or unreadable"),
    "edited_meta": (lambda entry, name: edit_meta(entry), "SHA-256"),
    "flipped_byte_edited": (lambda entry, name: flip_byte(entry / name, keep_mtime=False), "CRC-32"),
}


@pytest.mark.parametrize("damage, entry_kind", [
    ("truncated_file", "records"), ("truncated_file", "tokens"), ("garbled_footer", "tokens"),
    ("missing_file", "records"),
    ("garbled_meta", "records"), ("edited_meta", "tokens"), ("flipped_byte_edited", "tokens")])
def test_a_damaged_entry_is_rebuilt_with_a_warning(damage, entry_kind, tokenizer, tmp_path, caplog):
    path, cache = write_source(tmp_path), tmp_path / "cache"
    records_entry, tokens_entry, records, tokens = open_both(path, cache, tokenizer)
    entry = records_entry if entry_kind == "records" else tokens_entry
    damage_entry, problem = DAMAGE[damage]
    damage_entry(entry, "records.arrow" if entry_kind == "records" else "tokens.arrow")
    with caplog.at_level(logging.WARNING):
        again = open_both(path, cache, tokenizer)
    assert again[2] == records and again[3] == tokens
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(entry) in warnings[0] and problem in warnings[0], warnings
    assert len((cache / BUILD_LOG).read_text().splitlines()) == 3  # records, tokens, and the one rebuild
    assert entry_problem(entry) is None


def buffer_position(path: Path, buffer_index: int) -> int:
    """File position of the middle of buffer `buffer_index` (1: offsets, 2: ...) of the `query` token column's
    first chunk, a list<int32>: [validity, offsets, (child) validity, values]."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    base = source.read_buffer(1).address
    buffer = pa.ipc.open_file(source).read_all().column("query").chunk(0).buffers()[buffer_index]
    return buffer.address - base + buffer.size // 2


def flip_in_place(path: Path, position: int) -> None:
    """Flip one byte keeping size and mtime, as a failing disk would (not an edit)."""
    state = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(position)
        value = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([value ^ 0x55]))
    os.utime(path, ns=(state.st_atime_ns, state.st_mtime_ns))


def test_a_byte_flipped_in_place_among_offsets_is_found_by_every_open(tokenizer, tmp_path, caplog):
    """Before: reading the tokens then crashed the process (SIGBUS), or gave wrong lists."""
    path, cache = write_source(tmp_path), tmp_path / "cache"
    _, tokens_entry, _, tokens = open_both(path, cache, tokenizer)
    flip_in_place(tokens_entry / "tokens.arrow", buffer_position(tokens_entry / "tokens.arrow", 1))
    assert "cannot be read" in entry_problem(tokens_entry)
    with caplog.at_level(logging.WARNING):
        assert open_both(path, cache, tokenizer)[3] == tokens


def test_a_byte_flipped_in_place_among_token_ids_is_found_by_verify(tokenizer, tmp_path, caplog):
    """A flipped token id keeps the file well formed: only the CRC finds it (`data.verify_cache`)."""
    path, cache = write_source(tmp_path), tmp_path / "cache"
    _, tokens_entry, _, tokens = open_both(path, cache, tokenizer)
    flip_in_place(tokens_entry / "tokens.arrow", buffer_position(tokens_entry / "tokens.arrow", 3))
    assert entry_problem(tokens_entry) is None and "CRC-32" in entry_problem(tokens_entry, verify=True)
    with caplog.at_level(logging.WARNING):
        again = open_both(path, cache, tokenizer, verify=True)
    assert again[3] == tokens and any("damaged" in r.getMessage() for r in caplog.records)


def test_a_copied_entry_is_checked_once_then_trusted(tokenizer, tmp_path):
    """A new mtime with the same content (cp without -p) passes the CRC check, and meta.json records the
    new time so later opens skip reading the file."""
    path, cache = write_source(tmp_path), tmp_path / "cache"
    records_entry, *_ = open_both(path, cache, tokenizer)
    arrow = records_entry / "records.arrow"
    os.utime(arrow, ns=(arrow.stat().st_atime_ns, arrow.stat().st_mtime_ns + 10**9))
    open_both(path, cache, tokenizer)
    assert len((cache / BUILD_LOG).read_text().splitlines()) == 2  # not rebuilt
    assert json.loads((records_entry / META_FILE).read_text())["files"]["records.arrow"]["mtime_ns"] == \
        arrow.stat().st_mtime_ns


def test_a_read_only_cache_that_must_rebuild_is_one_line(tmp_path):
    entry = tmp_path / "a_file" / "records-x"
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(InputError) as error:
        cached_entry(entry, lambda folder: {})
    assert error.value.where == f"data.cache_dir {tmp_path / 'a_file'}" and "writable folder" in error.value.fix


# -- two processes ----------------------------------------------------------------------------------------

def _build_table(folder: Path) -> dict:
    import time

    import pyarrow as pa

    time.sleep(0.3)  # long enough for the other process to meet the damaged entry too
    schema = pa.schema([("value", pa.int64())])
    rows = write_arrow(folder / "values.arrow", schema, iter([pa.record_batch([pa.array(range(5000))], schema=schema)]))
    return {"rows": rows}


def _open_in_child(entry: str, barrier, results) -> None:
    from codiemb_pl.data.cache.entries import open_arrow

    barrier.wait()
    folder, _ = cached_entry(Path(entry), _build_table)
    results.put(sum(open_arrow(folder / "values.arrow").column("value").to_pylist()))


def test_two_processes_rebuild_a_damaged_entry_once(tmp_path):
    entry = tmp_path / "cache" / "values-key"
    cached_entry(entry, _build_table)
    truncate(entry / "values.arrow")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_open_in_child, args=(str(entry), barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    sums = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert sums == [sum(range(5000))] * 2 and all(process.exitcode == 0 for process in processes)
    assert len((tmp_path / "cache" / BUILD_LOG).read_text().splitlines()) == 2  # the first build, one rebuild
    assert entry_problem(entry) is None and not [p for p in entry.parent.iterdir() if ".tmp-" in p.name]
