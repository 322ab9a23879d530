"""Bad input, through the real CLI: each class of mistake ends with exactly one line
`codiemb: error: WHERE: WHAT (FIX)`, exit code 2, no traceback, and nothing written to the run folder
(no checkpoints, no logs, no export): the data and the sampler plan are checked before the Trainer runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from codiemb_pl.cli.main import main
from conftest import build_tiny_bert

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line; a `str` row is written verbatim (to write malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def ir_rows(count: int) -> list[dict]:
    return [{"query": f"question {i}", "positives": [f"answer {i}"], "negatives": [f"other {i}"]} for i in range(count)]


def sts_rows(count: int) -> list[dict]:
    return [{"sentence1": f"a sentence {i}", "sentence2": f"another sentence {i}", "score": i % 6} for i in range(count)]


def beir_folder(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[str]) -> Path:
    folder.mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir()
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels))
    return folder


def train_source(name: str, task: str, path: Path, **extra) -> str:
    return json.dumps([{"name": name, "task": task, "path": str(path), **extra}])


def val_source(name: str, path: Path) -> str:
    return json.dumps([{"name": name, "task": "ir", "path": str(path), "split": "dev"}])


DOCUMENTS = [{"_id": f"d{i}", "title": "", "text": f"document {i}"} for i in range(3)]
QUERIES = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(2)]


@dataclass
class BadInput:
    """One class of bad input: how to make it (files under `data`, CLI overrides) and what the line says."""

    build: Callable[[Path], list[str]]
    expected: list[str] = field(default_factory=list)  # fragments of the one error line ("{data}" = data folder)


BAD_INPUTS: dict[str, BadInput] = {
    "malformed_json_line": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_jsonl(
            d / "ir.jsonl", [ir_rows(1)[0], '{"query": "q", "positives": ["p"]']))],
        ["{data}/ir.jsonl:2: malformed JSON (Expecting ',' delimiter", "each line must hold one complete JSON object"]),
    "non_utf8_json_line": BadInput(  # the Arrow JSON-lines path used to raise UnicodeDecodeError
        lambda d: ["--data.train", train_source("ir", "ir", write_bytes(
            d / "ir.jsonl", [json.dumps(row).encode() for row in ir_rows(5)] + [b'{"query": "q\xff", "positives": ["p"]}']))],
        ["{data}/ir.jsonl:6: line is not valid UTF-8 (invalid start byte) (save the file as UTF-8)"]),
    "non_utf8_csv_row": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_bytes(
            d / "ir.csv", [b"query,positives", b"q1,p1", b"q2,p\xe92"]))],
        ["{data}/ir.csv:3: line is not valid UTF-8"]),
    "missing_field": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_jsonl(
            d / "ir.jsonl", [{"query": "q", "positives": ["p"]}, {"query": "q2", "passages": ["p"]}]))],
        ["{data}/ir.jsonl:2: missing field 'positives' (looked for column positives / positive / pos / document)",
         "available columns: ['passages', 'query']", "map it with columns:"]),
    "misnamed_mapped_column": BadInput(
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(d / "sts.jsonl", sts_rows(4)),
                                                columns={"score": "gold"})],
        ["{data}/sts.jsonl:1: missing field 'score' (looked for column gold)"]),
    "empty_text": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_jsonl(
            d / "ir.jsonl", ir_rows(2) + [{"query": "   ", "positives": ["p"]}]))],
        ["{data}/ir.jsonl:3: field 'query' is empty (remove the record or fill in the text)"]),
    "empty_passage": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_jsonl(
            d / "ir.jsonl", [{"query": "q", "positives": ["p", ""]}]))],
        ["{data}/ir.jsonl:1: field 'positives' holds an empty text"]),
    "non_numeric_score": BadInput(
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(
            d / "sts.jsonl", sts_rows(2) + [{"sentence1": "a", "sentence2": "b", "score": "high"}]))],
        ["{data}/sts.jsonl:3: score 'high' is not a number (write the score as a number)"]),
    "nan_score": BadInput(
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(
            d / "sts.jsonl", sts_rows(2) + [{"sentence1": "a", "sentence2": "b", "score": math.nan}]))],
        ["{data}/sts.jsonl:3: score is nan (give every pair a finite score)"]),
    "boolean_score": BadInput(  # a JSON boolean is not a score (Python's bool is an int: it read as 1.0)
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(
            d / "sts.jsonl", sts_rows(2) + [{"sentence1": "a", "sentence2": "b", "score": True}]))],
        ["{data}/sts.jsonl:3: score True is not a number", "write the score as a number"]),
    "boolean_scores_only": BadInput(  # every score a boolean: pyarrow reads a bool column
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(
            d / "sts.jsonl", [{"sentence1": f"a {i}", "sentence2": "b", "score": i % 2 == 0} for i in range(8)]))],
        ["{data}/sts.jsonl:1: score True is not a number"]),
    "out_of_range_score": BadInput(
        lambda d: ["--data.train", train_source("sts", "sts", write_jsonl(
            d / "sts.jsonl", sts_rows(4) + [{"sentence1": "a", "sentence2": "b", "score": 7}]), score_range=[0, 5])],
        ["{data}/sts.jsonl:5: score 7.0 is outside the score range [0, 5]", "score_range: [lo, hi]"]),
    "duplicate_document_id": BadInput(
        lambda d: ["--data.val", val_source("beir", beir_folder(
            d / "beir", DOCUMENTS + [{"_id": "d1", "text": "again"}], QUERIES, ["q0\td0\t1"]))],
        ["{data}/beir/corpus.jsonl:4: duplicate document id 'd1' (first at {data}/beir/corpus.jsonl:2)",
         "ids must be unique"]),
    "duplicate_query_id": BadInput(
        lambda d: ["--data.val", val_source("beir", beir_folder(
            d / "beir", DOCUMENTS, QUERIES + [{"_id": "q0", "text": "again"}], ["q0\td0\t1"]))],
        ["{data}/beir/queries.jsonl:3: duplicate query id 'q0'"]),
    "qrels_unknown_document": BadInput(
        lambda d: ["--data.val", val_source("beir", beir_folder(d / "beir", DOCUMENTS, QUERIES,
                                                                ["q0\td0\t1", "q1\td9\t1"]))],
        ["{data}/beir/qrels/dev.tsv:3: corpus id 'd9' is not in corpus.jsonl", "add the document or remove the judgement"]),
    "qrels_unknown_query": BadInput(
        lambda d: ["--data.val", val_source("beir", beir_folder(d / "beir", DOCUMENTS, QUERIES, ["q7\td0\t1"]))],
        ["{data}/beir/qrels/dev.tsv:2: query id 'q7' is not in queries.jsonl"]),
    "empty_sub_dataset": BadInput(
        lambda d: ["--data.train", train_source("ir", "ir", write_jsonl(d / "ir.jsonl", []))],
        ["{data}/ir.jsonl: the source holds no records"]),
    "smaller_than_one_global_batch": BadInput(
        lambda d: ["--data.train", train_source("small", "ir", write_jsonl(d / "ir.jsonl", ir_rows(3)))],
        ["sub-dataset small: 3 items are fewer than one global batch of 4 (batch_size 4 x 1 devices x "
         "1 accumulation steps)", "lower its batch_size"]),
    "unknown_policy": BadInput(
        lambda d: ["--data.policy", "shuffled"],
        ["data.policy: unknown sampler policy 'shuffled' (use one of: proportional, balanced, temperature, "
         "round_robin, sequential, mixed, joint)"]),
    "gradient_combination_without_joint_steps": BadInput(
        lambda d: ["--model.gradient_combination", "pcgrad"],
        ["model.gradient_combination: pcgrad combines the IR and STS gradients of a joint step, but data.policy is "
         "'proportional'", "set data.policy: joint"]),
    "joint_mgda_with_accumulation": BadInput(
        lambda d: ["--data.policy", "joint", "--model.gradient_combination", "mgda",
                   "--trainer.accumulate_grad_batches", "2"],
        ["trainer.accumulate_grad_batches: is 2, but model.gradient_combination mgda runs manual optimisation, which "
         "has no gradient accumulation"]),
    "conflict_probe_without_an_ir_validation_set": BadInput(
        lambda d: ["--model.conflict_every", "5", "--data.val",
                   '[{"name": "sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl"}]'],
        ["model.conflict_every: the gradient-conflict probe needs an IR validation set (its probe batch), data.val "
         "has none"]),
    "unknown_pooling": BadInput(
        lambda d: ["--model.pooling", "max"],
        ["model.pooling: unknown pooling mode 'max' (use one of: mean, cls, last)"]),
    "wrongly_typed_setting": BadInput(
        lambda d: ["--data.ir_batch_size", "many"],
        ["data.ir_batch_size: Expected a <class 'int'>. Got value: many", "--help"]),
}


def single_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert len(errors) == 1, err
    assert "\n" not in errors[0]
    return errors[0]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_before_training_with_one_line(case, tiny_model_dir, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    overrides = BAD_INPUTS[case].build(data)
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run),
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", "--trainer.callbacks.dirpath",
                 str(run / "model"), *overrides])
    assert code == 2
    line = single_error_line(capsys)
    for fragment in BAD_INPUTS[case].expected:
        assert fragment.format(data=data) in line, line
    assert not run.exists() or not any(run.iterdir()), f"written before the error: {list(run.rglob('*'))}"


def test_debug_flag_shows_the_traceback(tiny_model_dir, tmp_path):
    from codiemb_pl.errors import InputError

    with pytest.raises(InputError, match="unknown sampler policy"):
        main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
              "--trainer.default_root_dir", str(tmp_path / "run"), "--data.policy", "shuffled", "--debug"])


def test_fuse_refuses_mismatched_checkpoints_before_writing(tiny_model_dir, tmp_path, capsys):
    other = build_tiny_bert(tmp_path / "three_layers", layers=3)
    output = tmp_path / "fused"
    code = main(["fuse", "--base", str(tiny_model_dir), "--model", str(tiny_model_dir), "--model", str(other),
                 "--method", "uniform_soup", "--output", str(output)])
    assert code == 2
    line = single_error_line(capsys)
    assert f"{other}: architecture differs from the base {tiny_model_dir}" in line
    assert "num_hidden_layers is 3, base has 2" in line and "same base model" in line
    assert not output.exists() and not list(tmp_path.glob(".fused*"))
