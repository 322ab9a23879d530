"""Hard-negative mining: selection rules by hand, then `codiemb mine-negatives` on a small BEIR folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codiemb_pl.cli.main import main
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.workflows.mine import (
    MiningQuery,
    MiningSettings,
    format_histogram,
    load_mining_inputs,
    mine_hard_negatives,
    select_negatives,
)
from reference_text_path import load_training_records


class TableEncoder:
    """Stand-in for TextEncoder.encode: each text has a fixed embedding."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def encode(self, texts, batch_size=64, prompt=None, show_progress=False):
        return torch.tensor([self.vectors[text] for text in texts], dtype=torch.float32)


def test_select_negatives_applies_range_exclusion_margin_and_count():
    ranked = [10, 11, 12, 13, 14, 15]
    scores = [0.99, 0.9, 0.8, 0.7, 0.6, 0.5]
    settings = MiningSettings(rank_range=(2, 5), margin=None, num_negatives=10)
    assert select_negatives(ranked, scores, set(), 1.0, settings) == [11, 12, 13, 14]   # ranks 2..5
    assert select_negatives(ranked, scores, {12}, 1.0, settings) == [11, 13, 14]        # excluded doc skipped
    with_margin = MiningSettings(rank_range=(1, 6), margin=0.9, num_negatives=10)
    assert select_negatives(ranked, scores, set(), 0.9, with_margin) == [12, 13, 14, 15]  # score < 0.81 only
    two = MiningSettings(rank_range=(1, 6), margin=None, num_negatives=2)
    assert select_negatives(ranked, scores, {10}, 1.0, two) == [11, 12]                 # hardest first


def test_settings_reject_bad_values():
    for bad in ({"rank_range": (0, 5)}, {"rank_range": (6, 5)}, {"num_negatives": 0}, {"margin": 0.0}):
        with pytest.raises(InputError):
            MiningSettings(**bad)


def test_mining_uses_the_lowest_positive_score_and_never_returns_relevant_documents():
    vectors = {"q": [1.0, 0.0], "pos_a": [0.9, 0.436], "pos_b": [0.6, 0.8], "near": [0.95, 0.31],
               "mid": [0.5, 0.866], "far": [0.0, 1.0], "copy of pos_a": [0.9, 0.436]}
    corpus = {"a": "pos_a", "b": "pos_b", "n": "near", "m": "mid", "f": "far", "dup": "pos_a"}
    query = MiningQuery(query="q", positives=("pos_a", "pos_b"), relevant_doc_ids=frozenset({"a"}))
    settings = MiningSettings(rank_range=(1, 6), margin=0.9, num_negatives=5)
    result = mine_hard_negatives(TableEncoder(vectors), [query], corpus, settings)
    # lowest positive score 0.6 -> threshold 0.54: "near" (0.95) is too close to be a negative, and the
    # duplicate of a positive (other id, same text) is excluded like the positive itself
    assert result.records == [{"query": "q", "positives": ["pos_a", "pos_b"], "negatives": ["mid", "far"]}]
    assert result.histogram == {2: 1}


@pytest.fixture()
def beir_folder(tmp_path) -> Path:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"Title {i}", "text": f"document number {i} about topic {i % 5}"}
            for i in range(30)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"a question about topic {i} and number {i * 3}"} for i in range(8)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = ["query-id\tcorpus-id\tscore"]
    for i in range(8):
        rows += [f"q{i}\td{i * 3}\t1", f"q{i}\td{i * 3 + 1}\t2", f"q{i}\td{i * 3 + 2}\t0"]
    (folder / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_mine_negatives_command_on_a_beir_folder(beir_folder, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "mined.jsonl"
    code = main(["mine-negatives", str(beir_folder), "--split", "train", "--model", str(tiny_model_dir),
                 "--output", str(output), "--range", "1", "30", "--no-margin", "--num-negatives", "5",
                 "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    queries, corpus = load_mining_inputs(beir_folder, "train", None)
    assert len(records) == 8 and [r["query"] for r in records] == [q.query for q in queries]
    judged_zero = {corpus[f"d{i * 3 + 2}"] for i in range(8)}
    for record, query in zip(records, queries):
        relevant = {corpus[doc_id] for doc_id in query.relevant_doc_ids}
        assert set(record["positives"]) == relevant and len(relevant) == 2  # the score-2 document counts
        assert len(record["negatives"]) == 5 and len(set(record["negatives"])) == 5
        assert not relevant & set(record["negatives"])  # whole corpus in range: only exclusion keeps them out
    assert any(judged_zero & set(r["negatives"]) for r in records)  # relevance 0 is not relevant
    out = capsys.readouterr().out
    assert "negatives  queries" in out and "        5        8" in out
    trainer_view = load_training_records(SourceConfig(name="mined", task="ir", path=str(output)))
    assert all(len(r.negatives) == 5 for r in trainer_view)


def test_mine_negatives_from_an_ir_file_with_its_own_corpus(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "train.jsonl"
    lines = [{"query": f"query {i}", "positives": [f"passage {i}"]} for i in range(6)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out" / "mined.jsonl"
    code = main(["mine-negatives", str(source), "--model", str(tiny_model_dir), "--output", str(output),
                 "--range", "2", "4", "--no-margin", "--num-negatives", "3", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    for record in records:
        assert record["positives"][0] not in record["negatives"]
        assert 2 <= len(record["negatives"]) <= 3  # ranks 2..4 of 6 documents, minus the positive
        assert set(record["negatives"]) <= {f"passage {i}" for i in range(6)}


def test_bad_input_is_one_line_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    code = main(["mine-negatives", str(tmp_path), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "not a BEIR folder" in capsys.readouterr().err


def test_histogram_lists_every_count():
    text = format_histogram({0: 1, 4: 9})
    assert text.splitlines()[1].split()[:2] == ["0", "1"] and text.splitlines()[2].split()[:2] == ["4", "9"]
