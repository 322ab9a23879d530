"""Data sources: every reader, column mapping, STS score normalisation, BEIR, bad input, real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from codiemb_pl.data.readers import looks_like_hub_id, read_rows
from codiemb_pl.data.records import IRCorpus, IRRecord, STSRecord
from codiemb_pl.data.sources import SourceConfig, detect_format, load_ir_corpus, load_sts_pairs
from codiemb_pl.errors import InputError
from reference_text_path import load_training_records

TRIPLETS = [
    {"anchor": "what is a cat", "positive": "a cat is an animal", "negative": "a car has wheels"},
    {"anchor": "capital of france", "positive": "paris is the capital", "negative": "berlin is in germany"},
]
STS_ROWS = [
    {"sentence1": "a man plays", "sentence2": "a person plays", "score": 4.0},
    {"sentence1": "a dog runs", "sentence2": "it rains", "score": 0.0},
    {"sentence1": "kids laugh", "sentence2": "children laugh", "score": 5.0},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_delimited(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> Path:
    if delimiter == "\t":  # TSV is unquoted
        path.write_text("\n".join("\t".join(cells) for cells in [header, *rows]) + "\n", encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return path


def ir_source(path: Path | str, **kwargs) -> SourceConfig:
    return SourceConfig(name="ir-test", task="ir", path=str(path), **kwargs)


def sts_source(path: Path | str, **kwargs) -> SourceConfig:
    return SourceConfig(name="sts-test", task="sts", path=str(path), **kwargs)


def write_beir(folder: Path, qrels_lines: list[str], corpus: list | None = None, queries: list | None = None) -> Path:
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Cats", "text": "Cats purr."},
        {"_id": "d2", "title": "", "text": "Dogs bark. "},
        {"_id": "d3", "title": "Cars", "text": "Cars drive."},
    ]
    queries = queries if queries is not None else [
        {"_id": "q1", "text": "do cats purr"}, {"_id": "q2", "text": "do dogs bark"}, {"_id": "q3", "text": "unjudged"},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(l + "\n" for l in qrels_lines))
    return folder


# --- readers and formats -------------------------------------------------------------------------

def test_jsonl_triplets_become_ir_records_with_one_positive_and_one_negative(tmp_path):
    records = load_training_records(ir_source(write_jsonl(tmp_path / "t.jsonl", TRIPLETS)))
    assert records == [IRRecord("what is a cat", ("a cat is an animal",), ("a car has wheels",)),
                       IRRecord("capital of france", ("paris is the capital",), ("berlin is in germany",))]


def test_jsonl_lists_of_positives_and_missing_negatives(tmp_path):
    rows = [{"query": "q", "positives": ["p1", "p2"], "hard_negatives": ["n1", "n2", "n3"]},
            {"question": "q2", "document": "p"}]
    records = load_training_records(ir_source(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert records[0] == IRRecord("q", ("p1", "p2"), ("n1", "n2", "n3"))
    assert records[1] == IRRecord("q2", ("p",), ())


def test_json_array_file_is_read(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRIPLETS))
    assert [r.query for r in load_training_records(ir_source(path))] == ["what is a cat", "capital of france"]


def test_csv_with_json_list_cells_and_quoted_commas(tmp_path):
    path = write_delimited(tmp_path / "t.csv", ["query", "positives", "negatives"],
                           [["q, with comma", json.dumps(["p1", "p2"]), ""],
                            ["q2", "[sic] plain text", json.dumps(["n1"])]], ",")
    records = load_training_records(ir_source(path))
    assert records == [IRRecord("q, with comma", ("p1", "p2"), ()), IRRecord("q2", ("[sic] plain text",), ("n1",))]


def test_tsv_with_json_list_cells_and_literal_quotes(tmp_path):
    path = write_delimited(tmp_path / "t.tsv", ["anchor", "pos", "neg"],
                           [['he said "hi', '["p1", "p2"]', '["n1", "n2"]']], "\t")
    assert load_training_records(ir_source(path)) == [IRRecord('he said "hi', ("p1", "p2"), ("n1", "n2"))]


def test_tsv_sts_scores_are_read_from_strings(tmp_path):
    path = write_delimited(tmp_path / "s.tsv", ["s1", "s2", "similarity"], [["a", "b", "2.5"], ["c", "d", "5"]], "\t")
    assert load_sts_pairs(sts_source(path)) == [STSRecord("a", "b", 0.5), STSRecord("c", "d", 1.0)]


def test_parquet_with_list_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"query": ["q1", "q2"], "positives": [["a", "b"], ["c"]], "negatives": [[], ["n"]]}), path)
    assert load_training_records(ir_source(path)) == [IRRecord("q1", ("a", "b"), ()), IRRecord("q2", ("c",), ("n",))]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_dataset_saved_to_disk(tmp_path, hf_cache):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STS_ROWS),
                          "validation": datasets.Dataset.from_list(STS_ROWS[:1])}).save_to_disk(str(folder))
    assert detect_format(sts_source(folder))[1] == "hf"
    assert [r.score for r in load_sts_pairs(sts_source(folder))] == [0.8, 0.0, 1.0]
    assert len(load_sts_pairs(sts_source(folder, split="validation"))) == 1
    with pytest.raises(InputError, match="split 'dev' not found"):
        load_sts_pairs(sts_source(folder, split="dev"))


def test_hf_local_data_folder_via_load_dataset(tmp_path, hf_cache):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRIPLETS)
    records = load_training_records(ir_source(folder, format="hf"))
    assert [r.positives for r in records] == [("a cat is an animal",), ("paris is the capital",)]
    assert records[0].negatives == ("a car has wheels",)
    assert "[train]: record 1" in list(read_rows(str(folder), "hf"))[1].where


def test_auto_format_detection(tmp_path):
    beir = write_beir(tmp_path / "beir", ["q1\td1\t1"])
    assert detect_format(ir_source(beir))[1] == "beir"
    assert detect_format(ir_source("sentence-transformers/all-nli"))[1] == "hf"
    for suffix, fmt in [(".jsonl", "jsonl"), (".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet")]:
        (tmp_path / f"x{suffix}").write_text("")
        assert detect_format(ir_source(tmp_path / f"x{suffix}"))[1] == fmt
    assert looks_like_hub_id("owner/name") and not looks_like_hub_id("data/train.jsonl")
    with pytest.raises(InputError, match="no such file"):
        detect_format(ir_source("data/missing.jsonl"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match="extension"):
        detect_format(ir_source(tmp_path / "x.txt"))


def test_pkg_path_is_resolved(tmp_path):
    location, fmt = detect_format(sts_source("pkg://codiemb_pl/errors.py", format="jsonl"))
    assert Path(location).is_file() and location.endswith("errors.py") and fmt == "jsonl"


# --- column mapping and STS scores ---------------------------------------------------------------

def test_explicit_columns_override_aliases(tmp_path):
    rows = [{"query": "ignored", "title": "real query", "answer": "pos", "wrong": "neg"}]
    records = load_training_records(ir_source(write_jsonl(tmp_path / "t.jsonl", rows),
                                              columns={"query": "title", "positives": "answer", "negatives": "wrong"}))
    assert records == [IRRecord("real query", ("pos",), ("neg",))]


def test_unknown_column_field_is_rejected():
    with pytest.raises(InputError, match="unknown field"):
        sts_source("x.jsonl", columns={"sentence1": "a"})


def test_sts_default_range_zero_to_five_and_explicit_range(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", STS_ROWS)
    assert [r.score for r in load_sts_pairs(sts_source(path))] == [0.8, 0.0, 1.0]
    assert [r.score for r in load_sts_pairs(sts_source(path, score_range=[-5, 5]))] == [0.9, 0.5, 1.0]


def test_sts_scores_already_in_unit_range_are_kept(tmp_path):
    rows = [{"text_a": "a", "text_b": "b", "label": 1}, {"text_a": "c", "text_b": "d", "label": 0.25}]
    assert [r.score for r in load_sts_pairs(sts_source(write_jsonl(tmp_path / "s.jsonl", rows)))] == [1.0, 0.25]


def test_max_samples_with_and_without_seed(tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert [r.query for r in load_training_records(ir_source(path, max_samples=3))] == ["q0", "q1", "q2"]
    first = [r.query for r in load_training_records(ir_source(path, max_samples=5, seed=7))]
    again = [r.query for r in load_training_records(ir_source(path, max_samples=5, seed=7))]
    assert first == again and first != ["q0", "q1", "q2", "q3", "q4"] and len(set(first)) == 5


def test_source_config_from_yaml_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--sources", type=list[SourceConfig])
    parsed = parser.instantiate(parser.parse_string(
        "sources:\n  - {name: stsb, task: sts, path: a.jsonl, score_range: [0, 5], columns: {text1: s}}\n"))
    assert parsed.sources == [SourceConfig(name="stsb", task="sts", path="a.jsonl", score_range=[0.0, 5.0],
                                           columns={"text1": "s"})]


# --- BEIR ---------------------------------------------------------------------------------------

def test_beir_corpus_follows_mteb_conventions(tmp_path):
    folder = write_beir(tmp_path / "b", ["q1\td1\t2", "q1\td3\t0", "q2\td2\t1"])
    retrieval_set = load_ir_corpus(ir_source(folder))
    assert retrieval_set == IRCorpus(queries={"q1": "do cats purr", "q2": "do dogs bark"},
                                     corpus={"d1": "Cats Cats purr.", "d2": "Dogs bark.", "d3": "Cars Cars drive."},
                                     qrels={"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1}})


def test_beir_training_records_keep_positive_judgements_only(tmp_path):
    folder = write_beir(tmp_path / "b", ["q1\td1\t1", "q1\td3\t1", "q2\td2\t0"])
    (folder / "qrels" / "train.tsv").write_text((folder / "qrels" / "test.tsv").read_text())
    assert load_training_records(ir_source(folder)) == [IRRecord("do cats purr", ("Cats Cats purr.", "Cars Cars drive."))]


@pytest.mark.parametrize("qrels_line, problem", [("q9\td1\t1", "query id 'q9'"), ("q1\td9\t1", "corpus id 'd9'"),
                                                 ("q1\td1\thigh", "not an integer"), ("q1\td1", "3 tab-separated")])
def test_beir_bad_qrels_name_file_and_line(tmp_path, qrels_line, problem):
    folder = write_beir(tmp_path / "b", ["q1\td1\t1", qrels_line])
    with pytest.raises(InputError, match=problem) as error:
        load_ir_corpus(ir_source(folder))
    assert error.value.where == f"{folder / 'qrels' / 'test.tsv'}:3"


def test_beir_duplicate_ids_and_missing_split(tmp_path):
    corpus = [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}]
    folder = write_beir(tmp_path / "dup", ["q1\td1\t1"], corpus=corpus)
    with pytest.raises(InputError, match="duplicate document id 'd1'") as error:
        load_ir_corpus(ir_source(folder))
    assert error.value.where == f"{folder / 'corpus.jsonl'}:2"
    queries = [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]
    with pytest.raises(InputError, match="duplicate query id 'q1'"):
        load_ir_corpus(ir_source(write_beir(tmp_path / "dupq", ["q1\td1\t1"], queries=queries)))
    with pytest.raises(InputError, match="no qrels for split 'dev'; available splits: \\['test'\\]"):
        load_ir_corpus(ir_source(write_beir(tmp_path / "ok", ["q1\td1\t1"]), split="dev"))


def test_ir_corpus_needs_a_beir_folder(tmp_path):
    with pytest.raises(InputError, match="BEIR folder"):
        load_ir_corpus(ir_source(write_jsonl(tmp_path / "t.jsonl", TRIPLETS)))


# --- bad input names file and line --------------------------------------------------------------

@pytest.mark.parametrize("bad_line, problem", [
    ('{"query": "q", "positive": ', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"query": "  ", "positive": "p"}', "'query' is empty"),
    ('{"query": "q", "positive": []}', "no positives"),
    ('{"query": "q", "positive": ["p", ""]}', "empty text"),
    ('{"query": "q", "positive": [3]}', "holds a int"),
    ('{"query": ["q"], "positive": "p"}', "must be one text"),
    ('{"query": "q", "passage": "p"}', r"missing field 'positives'.*available columns: \['passage', 'query'\]"),
])
def test_bad_ir_line_raises_with_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "ok", "positive": "p"}\n\n' + bad_line + "\n")
    with pytest.raises(InputError, match=problem) as error:
        load_training_records(ir_source(path))
    assert f"train.jsonl:3" in str(error.value)


@pytest.mark.parametrize("bad_score, problem", [("7", "outside the score range"), ("NaN", "finite"),
                                                ("high", "not a number"), ("", "not a number")])
def test_bad_sts_score_raises_with_file_and_line(tmp_path, bad_score, problem):
    path = write_delimited(tmp_path / "pairs.csv", ["sentence1", "sentence2", "score"],
                           [["a", "b", "3"], ["c", "d", bad_score]], ",")
    with pytest.raises(InputError, match=problem) as error:
        load_sts_pairs(sts_source(path, score_range=[0, 5]))
    assert error.value.where == f"{path}:3"


def test_score_above_inferred_range_asks_for_score_range(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [*STS_ROWS, {"sentence1": "x", "sentence2": "y", "score": 10}])
    with pytest.raises(InputError, match="score_range") as error:
        load_sts_pairs(sts_source(path))
    assert error.value.where == f"{path}:4"


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("query,positive\nq,p\nq2,p2,extra\n")
    with pytest.raises(InputError, match="3 fields but the header has 2") as error:
        load_training_records(ir_source(path))
    assert error.value.where == f"{path}:3"


def test_parquet_bad_record_names_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text1": ["a", " "], "text2": ["b", "c"], "score": [0.5, 0.5]}), path)
    with pytest.raises(InputError, match="'text1' is empty") as error:
        load_sts_pairs(sts_source(path))
    assert error.value.where == f"{path}: record 1"


def test_empty_source_and_bad_config(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no records"):
        load_training_records(ir_source(tmp_path / "empty.jsonl"))
    with pytest.raises(InputError, match="lo < hi"):
        sts_source("x.jsonl", score_range=[5, 0])
    with pytest.raises(InputError, match="max_samples"):
        ir_source("x.jsonl", max_samples=0)
    with pytest.raises(InputError, match="not STS"):
        load_sts_pairs(ir_source("x.jsonl"))


# --- real data ----------------------------------------------------------------------------------

def test_real_stsb_train(shared_data):
    pairs = load_sts_pairs(sts_source(shared_data / "sts" / "stsb" / "train.jsonl"))
    assert len(pairs) == 5749
    assert min(p.score for p in pairs) == 0.0 and max(p.score for p in pairs) == 1.0
    assert pairs[1] == STSRecord("A man is playing a large flute.", "A man is playing a flute.", 3.8 / 5)


def test_real_scifact(shared_data):
    folder = shared_data / "ir" / "scifact"
    test_set = load_ir_corpus(ir_source(folder))
    assert (len(test_set.queries), sum(map(len, test_set.qrels.values())), len(test_set.corpus)) == (300, 339, 5183)
    assert set(test_set.queries) == set(test_set.qrels)
    assert test_set.qrels["1"] == {"31715818": 1}
    training = load_training_records(ir_source(folder, split="train"))
    assert len(training) == 809 and all(record.positives for record in training)


def test_real_snli_triplets(shared_data):
    records = load_training_records(ir_source(shared_data / "train" / "snli_triplets.jsonl", max_samples=10))
    assert len(records) == 10 and all(len(r.positives) == 1 and len(r.negatives) == 1 for r in records)
