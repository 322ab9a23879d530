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


# -- teacher-aware mining (issue 23, item 5) -----------------------------------------------------------------------
class TableTeacher:
    """Stand-in cross-encoder teacher: a fixed logit per (query, text), sigmoid onto [0, 1]."""

    kind = "cross_encoder"

    def __init__(self, logits: dict[tuple[str, str], float]):
        self.logits = logits
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def score_candidates(self, queries, candidates):
        self.calls.append((list(queries), [list(texts) for texts in candidates]))
        return [torch.tensor([self.logits[query, text] for text in texts]) for query, texts in zip(queries, candidates)]

    @staticmethod
    def unit_scores(raw):
        return torch.sigmoid(raw)


HAND_LOGITS = {("q", "p1"): 2.0, ("q", "p2"): 0.0, ("q", "c1"): 3.0, ("q", "c2"): 1.0, ("q", "c3"): -0.1,
               ("q", "c4"): -1.0, ("q", "c5"): -3.0, ("r", "p3"): 0.0, ("r", "c6"): 1.0, ("r", "c7"): 2.0}
HAND_POOLS = [("q", ("p1", "p2"), ["c1", "c2", "c3", "c4", "c5"]), ("r", ("p3",), ["c6", "c7"])]


@pytest.mark.parametrize("top_k, kept_queries, removed_queries, removed_candidates", [
    (None, ["q", "r"], 0, 3 + 2),   # r: sigmoid(1), sigmoid(2) >= 0.9 x sigmoid(0): both dropped
    (3, ["q", "r"], 0, 3 + 2),      # r: two candidates above its positive -> rank 3 <= 3
    (2, ["q"], 1, 3),               # q: one candidate (c1: 3.0) above its best positive (2.0) -> rank 2 <= 2
    (1, [], 2, 0),
])
def test_teacher_filters_remove_what_the_hand_computation_says(top_k, kept_queries, removed_queries,
                                                               removed_candidates):
    from codiemb_pl.workflows.teacher_mining import TeacherFilterSettings, teacher_filtered_records

    records, report = teacher_filtered_records(TableTeacher(HAND_LOGITS), HAND_POOLS,
                                               TeacherFilterSettings(margin=0.9, top_k=top_k), num_negatives=1)
    assert [record["query"] for record in records if record is not None] == kept_queries
    assert report.queries_removed_by_top_k == removed_queries
    assert report.candidates_removed_by_margin == removed_candidates
    assert (report.queries_rescored, report.candidates_rescored) == (2, 7)
    if "q" in kept_queries:
        # lowest positive sigmoid(0) = 0.5 -> threshold 0.45: c1, c2 and c3 (sigmoid(-0.1) = 0.475) dropped;
        # the first kept candidate, c4, is the one negative; teacher_scores = positives' logits, then c4's
        assert records[0] == {"query": "q", "positives": ["p1", "p2"], "negatives": ["c4"],
                              "teacher_scores": [2.0, 0.0, -1.0]}


def test_without_margin_the_teacher_only_scores_and_the_consistency_filter_applies():
    from codiemb_pl.workflows.teacher_mining import TeacherFilterSettings, teacher_filtered_records

    records, report = teacher_filtered_records(TableTeacher(HAND_LOGITS), HAND_POOLS,
                                               TeacherFilterSettings(margin=None, top_k=None), num_negatives=2)
    assert report.candidates_removed_by_margin == 0 and report.queries_removed_by_top_k == 0
    assert records[1] == {"query": "r", "positives": ["p3"], "negatives": ["c6", "c7"],
                          "teacher_scores": [0.0, 1.0, 2.0]}


def test_the_teacher_sees_every_candidate_in_the_range_not_only_the_first_negatives():
    vectors = {"q": [1.0, 0.0], "p": [1.0, 0.0], "a": [0.9, 0.436], "b": [0.8, 0.6], "c": [0.5, 0.866]}
    corpus = {"p": "p", "a": "a", "b": "b", "c": "c"}
    teacher = TableTeacher({("q", "p"): 1.0, ("q", "a"): 4.0, ("q", "b"): -2.0, ("q", "c"): -3.0})
    settings = MiningSettings(rank_range=(1, 4), margin=None, num_negatives=1)
    from codiemb_pl.workflows.teacher_mining import TeacherFilterSettings

    result = mine_hard_negatives(TableEncoder(vectors), [MiningQuery("q", ("p",))], corpus, settings,
                                 teacher=teacher, teacher_filter=TeacherFilterSettings(margin=0.95))
    assert teacher.calls == [(["q"], [["p", "a", "b", "c"]])]   # positives, then the miner's candidates in rank order
    # a (the miner's hardest) is a false negative for the teacher; b, the next one it keeps, is the negative
    assert result.records == [{"query": "q", "positives": ["p"], "negatives": ["b"], "teacher_scores": [1.0, -2.0]}]
    assert result.teacher_report.candidates_removed_by_margin == 1


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tmp_path_factory) -> Path:
    """A random BertForSequenceClassification with one output (a reranker's shape), MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from conftest import minilm_path

    folder = tmp_path_factory.mktemp("cross_encoder")
    torch.manual_seed(5)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def test_mine_negatives_with_a_cross_encoder_teacher(beir_folder, tiny_model_dir, tiny_cross_encoder_dir, tmp_path,
                                                     capsys):
    from codiemb_pl.model.teacher import TeacherSettings, load_teacher

    output = tmp_path / "mined.jsonl"
    assert main(["mine-negatives", str(beir_folder), "--model", str(tiny_model_dir), "--output", str(output),
                 "--range", "1", "30", "--num-negatives", "3", "--no-margin", "--no-progress",
                 "--teacher", str(tiny_cross_encoder_dir),
                 "--teacher-margin", "1.0", "--teacher-top-k", "12", "--teacher-batch-size", "16"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    teacher = load_teacher(TeacherSettings(str(tiny_cross_encoder_dir), batch_size=7))
    queries, _ = load_mining_inputs(beir_folder, "train", None)
    kept = {record["query"] for record in records}
    # the whole 30-document corpus is in range; each query's 2 relevant documents are never candidates
    assert "(cross_encoder) rescored 224 candidates of 8 queries" in out
    assert f"top-12 consistency removed {len(queries) - len(kept)} queries" in out and 0 < len(kept) < 8
    assert int(out.split("margin 1 removed ")[1].split()[0]) > 0
    for record in records:
        texts = record["positives"] + record["negatives"]
        expected = teacher.pair_scores([record["query"]] * len(texts), texts)
        torch.testing.assert_close(torch.tensor(record["teacher_scores"]), expected, atol=1e-5, rtol=1e-5)
        unit = torch.sigmoid(expected)
        assert bool((unit[2:] < unit[:2].min()).all())   # margin 1.0: no negative scores as high as a positive


def test_teacher_scores_from_a_bi_encoder_teacher_train_a_student(tiny_model_dir, tmp_path, capsys):
    from conftest import minilm_path

    source = tmp_path / "train.jsonl"
    lines = [{"query": f"what is topic {i}", "positives": [f"topic {i} is about thing {i}"]} for i in range(8)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join([f"topic {i} is about thing {i}" for i in range(8)] +
                                [f"an unrelated note number {i}" for i in range(12)]) + "\n")
    mined = tmp_path / "mined.jsonl"
    assert main(["mine-negatives", str(source), "--corpus", str(corpus), "--model", str(tiny_model_dir),
                 "--output", str(mined), "--range", "1", "8", "--num-negatives", "2", "--no-margin",
                 "--teacher", minilm_path(), "--teacher-margin", "0.95", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(bi_encoder) rescored" in out and "no consistency filter" in out
    records = [json.loads(line) for line in mined.read_text().splitlines()]
    assert len(records) == 8
    assert all(len(r["teacher_scores"]) == len(r["positives"]) + len(r["negatives"]) for r in records)
    assert all(max(r["teacher_scores"][1:], default=-1) < 0.95 * max(r["teacher_scores"][0], 0) for r in records)
    train = [{"name": "mined", "task": "ir", "path": str(mined)}]
    assert main(["fit", "--config", str(Path(__file__).parent / "conf" / "tiny.yaml"),
                 "--model.model_name_or_path", str(tiny_model_dir),
                 "--model.distillation", json.dumps({"ir_weight": 0.5, "scores_from": "data"}),
                 "--data.train", json.dumps(train), "--data.val", "[]", "--data.cache_dir", str(tmp_path / "cache"),
                 "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.callbacks", "[]"]) == 0
    trainer_view = load_training_records(SourceConfig(name="mined", task="ir", path=str(mined)))
    assert [list(r.teacher_scores) for r in trainer_view] == [r["teacher_scores"] for r in records]


@pytest.mark.parametrize("extra, message", [
    (["--teacher-top-k", "3"], "--teacher-top-k: is given without --teacher"),
    (["--teacher", "x", "--teacher-top-k", "0"], "--teacher-top-k: must be at least 1, got 0"),
    (["--teacher", "x", "--teacher-margin", "-1"], "--teacher-margin: must be > 0"),
    (["--teacher", "x", "--teacher-batch-size", "0"], "--teacher-batch-size: must be at least 1"),
])
def test_bad_teacher_options_are_one_line(extra, message, tmp_path, capsys):
    assert main(["mine-negatives", str(tmp_path), "--model", "m", "--output", str(tmp_path / "o.jsonl"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
