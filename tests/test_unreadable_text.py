"""Files that are not valid UTF-8: every reader (the Arrow JSON-lines path of the training cache, the row
readers for jsonl / json / csv / tsv, BEIR qrels, `predict` text files, mining corpora) stops with one
`InputError` naming the file and the line of the first bad byte, never a traceback and never a cache entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codiemb_pl.data.cache.records import open_records
from codiemb_pl.data.sources import SourceConfig, iter_ir_records, load_ir_corpus, load_sts_pairs
from codiemb_pl.data.texts import read_texts
from codiemb_pl.errors import InputError

BAD = b"\xff"  # never valid in UTF-8


def ir_lines(count: int) -> list[bytes]:
    return [json.dumps({"query": f"question {i}", "positives": [f"answer {i}"]}).encode() for i in range(count)]


def write_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def ir_source(path: Path) -> SourceConfig:
    return SourceConfig(name="ir", task="ir", path=str(path))


def assert_names_line(error: InputError, path: Path, line: int) -> None:
    assert error.where == f"{path}:{line}", str(error)
    assert "not valid UTF-8" in error.problem and error.fix == "save the file as UTF-8"


def test_arrow_json_lines_path_names_the_line_and_writes_no_entry(tmp_path):
    """pyarrow.json accepts the byte; converting the column used to raise UnicodeDecodeError (a traceback)."""
    lines = ir_lines(8)
    lines[5] = lines[5].replace(b"answer 5", b"answer " + BAD + b"5")
    path = write_bytes(tmp_path / "ir.jsonl", lines)
    with pytest.raises(InputError) as error:
        open_records(ir_source(path), tmp_path / "cache")
    assert_names_line(error.value, path, 6)
    assert not list((tmp_path / "cache").glob("records-*/"))


def test_arrow_path_checks_columns_it_does_not_keep(tmp_path):
    """A bad byte in an unused column is refused too, as the row reader refuses the line (same decision)."""
    lines = [json.dumps({"query": f"q {i}", "positives": ["p"], "note": "x"}).encode() for i in range(4)]
    lines[2] = lines[2].replace(b'"x"', b'"' + BAD + b'"')
    path = write_bytes(tmp_path / "ir.jsonl", lines)
    with pytest.raises(InputError) as error:
        open_records(ir_source(path), tmp_path / "cache")
    assert_names_line(error.value, path, 3)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", b","), (".tsv", b"\t")])
def test_delimited_files_name_the_line(tmp_path, suffix, delimiter):
    rows = [b"query" + delimiter + b"positives", b"q1" + delimiter + b"p1", b"q2" + delimiter + b"p2",
            b"q3" + delimiter + b"p" + BAD + b"3", b"q4" + delimiter + b"p4"]
    path = write_bytes(tmp_path / f"ir{suffix}", rows)
    with pytest.raises(InputError) as error:
        list(iter_ir_records(ir_source(path)))
    assert_names_line(error.value, path, 4)
    with pytest.raises(InputError) as error:  # the training cache reads them row by row: same line
        open_records(ir_source(path), tmp_path / "cache")
    assert_names_line(error.value, path, 4)


def test_a_line_number_counts_lines_inside_quoted_csv_cells(tmp_path):
    path = write_bytes(tmp_path / "ir.csv", [b"query,positives", b'q1,"two', b'lines"', b"q2,p" + BAD])
    with pytest.raises(InputError) as error:
        list(iter_ir_records(ir_source(path)))
    assert_names_line(error.value, path, 4)


def test_json_array_file_names_the_line(tmp_path):
    path = write_bytes(tmp_path / "ir.json", [b"[", b'{"query": "q", "positives": ["p"]},',
                                              b'{"query": "q' + BAD + b'", "positives": ["p"]}', b"]"])
    with pytest.raises(InputError) as error:
        list(iter_ir_records(ir_source(path)))
    assert_names_line(error.value, path, 3)


def test_sts_json_lines_name_the_line(tmp_path):
    lines = [json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 1}).encode() for i in range(3)]
    lines[1] = lines[1].replace(b"b 1", b"b " + BAD)
    path = write_bytes(tmp_path / "sts.jsonl", lines)
    source = SourceConfig(name="sts", task="sts", path=str(path))
    with pytest.raises(InputError) as error:
        open_records(source, tmp_path / "cache")
    assert_names_line(error.value, path, 2)
    with pytest.raises(InputError) as error:
        load_sts_pairs(source)
    assert_names_line(error.value, path, 2)


def test_beir_qrels_name_the_line(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "doc"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "query"}\n')
    qrels = write_bytes(folder / "qrels" / "test.tsv", [b"query-id\tcorpus-id\tscore", b"q1\td1\t1", b"q1\td" + BAD])
    with pytest.raises(InputError) as error:
        load_ir_corpus(ir_source(folder))
    assert_names_line(error.value, qrels, 3)


def test_predict_text_file_names_the_line(tmp_path):
    path = write_bytes(tmp_path / "texts.txt", [b"first", b"second", b"th" + BAD + b"rd"])
    with pytest.raises(InputError) as error:
        read_texts(str(path))
    assert_names_line(error.value, path, 3)


def test_mining_text_corpus_names_the_line(tmp_path):
    from codiemb_pl.workflows.mine import read_corpus

    path = write_bytes(tmp_path / "corpus.txt", [b"doc one", BAD + b"doc two"])
    with pytest.raises(InputError) as error:
        read_corpus(path)
    assert_names_line(error.value, path, 2)


def test_valid_multibyte_text_is_read_unchanged(tmp_path):
    """The checks refuse bad bytes only: accents, CJK and emoji (multi-byte UTF-8) pass both paths."""
    texts = ["café crème", "東京の天気", "emoji 🙂 ok", "Ω≈ç√∫"]
    path = tmp_path / "ir.jsonl"
    path.write_text("".join(json.dumps({"query": t, "positives": [t + "!"]}, ensure_ascii=False) + "\n"
                            for t in texts), encoding="utf-8")
    table = open_records(ir_source(path), tmp_path / "cache")
    assert [table.record(i).query for i in range(len(texts))] == texts
