"""`codiemb evaluate` on the tiny model: JSON shape and names, equality with the evaluation suite,
Lightning checkpoints as input, and one-line errors that leave no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main
from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from codiemb_pl.evaluation.geometry import GEOMETRY_METRIC_NAMES
from codiemb_pl.evaluation.suite import evaluate_encoder
from codiemb_pl.model.encoder import TextEncoder
from conftest import build_tiny_bert

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
STS_NAMES = {"cosine_spearman", "cosine_pearson"}
IR_NAMES = {"ndcg_at_10", "mrr_at_10", "recall_at_100", "map_at_100"}

STS_ROWS = [("A man is playing a guitar.", "A person plays an instrument.", 4.2),
            ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.8),
            ("The stock market fell today.", "Shares dropped sharply this afternoon.", 4.6),
            ("She is cooking pasta.", "A woman prepares dinner.", 3.5),
            ("Kids play football.", "The weather is cold.", 0.0),
            ("He reads a book.", "A man is reading a novel.", 4.9)]
DOCS = {"d1": ("Guitars", "A guitar has six strings and is played by plucking."),
        "d2": ("", "Pasta is boiled in salted water until al dente."),
        "d3": ("Markets", "Stock prices fall when investors sell shares."),
        "d4": ("Dogs", "Dogs need daily walks in the park."),
        "d5": ("Weather", "Cold weather arrives in winter."),
        "d6": ("Books", "Novels are long works of fiction.")}
QUERIES = {"q1": "how many strings does a guitar have", "q2": "how to cook pasta",
           "q3": "why do stock prices drop", "q4": "unjudged query"}
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "d6", 0), ("q3", "d3", 1), ("q3", "d4", 1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_data")
    sts = root / "pairs.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in STS_ROWS))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                               for i, (t, x) in DOCS.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in QUERIES.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q, d, r in QRELS))
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return {"sts": sts, "beir": beir}


def run_evaluate(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_mteb_names_and_equals_the_evaluation_suite(tiny_model_dir, data, tmp_path, capsys):
    output = tmp_path / "results.json"
    code, out, _ = run_evaluate(["--model", str(tiny_model_dir), "--sts", f"pairs={data['sts']}",
                                 "--ir", f"beir={data['beir']}", "--output", str(output), "--batch-size", "4"], capsys)
    assert code == 0
    results = json.loads(output.read_text())
    assert set(results) == {"pairs", "beir"}
    assert set(results["pairs"]) == STS_NAMES and set(results["beir"]) == IR_NAMES

    sets = [EvalSet.from_sts("pairs", load_sts_pairs(SourceConfig("pairs", "sts", str(data["sts"])))),
            EvalSet.from_ir("beir", load_ir_corpus(SourceConfig("beir", "ir", str(data["beir"]))))]
    expected, summary = evaluate_encoder(TextEncoder(str(tiny_model_dir)), sets, batch_size=7)
    for name, metrics in expected.items():
        for metric, value in metrics.items():
            assert results[name][metric] == pytest.approx(value, abs=1e-6), (name, metric)
    assert "ndcg_at_10" in out and "pairs" in out and f"{summary['avg']:.4f}" in out


def test_split_selects_the_qrels_file(tiny_model_dir, data, tmp_path, capsys):
    output = tmp_path / "dev.json"
    code, _, _ = run_evaluate(["--model", str(tiny_model_dir), "--ir", f"dev={data['beir']}", "--split", "dev",
                               "--output", str(output)], capsys)
    assert code == 0
    dev = json.loads(output.read_text())["dev"]
    corpus = load_ir_corpus(SourceConfig("dev", "ir", str(data["beir"]), split="dev"))
    expected, _ = evaluate_encoder(TextEncoder(str(tiny_model_dir)), [EvalSet.from_ir("dev", corpus)])
    assert dev == pytest.approx(expected["dev"], abs=1e-6)
    assert dev["recall_at_100"] == 1.0          # one judged query, six documents: always retrieved


def test_geometry_adds_every_geometry_metric(tiny_model_dir, data, tmp_path, capsys):
    output = tmp_path / "geometry.json"
    code, _, _ = run_evaluate(["--model", str(tiny_model_dir), "--sts", f"pairs={data['sts']}",
                               "--ir", f"beir={data['beir']}", "--geometry", "--output", str(output)], capsys)
    assert code == 0
    results = json.loads(output.read_text())
    for name, task_names in (("pairs", STS_NAMES), ("beir", IR_NAMES)):
        assert set(results[name]) == task_names | set(GEOMETRY_METRIC_NAMES)
        assert 1 <= results[name]["numerical_rank"] <= 32
        assert -1.0 <= results[name]["token_similarity"] <= 1.0
        assert 0.0 <= results[name]["alignment"] <= 4.0


def test_sts_range_is_applied_to_every_file(tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_evaluate(["--model", str(tiny_model_dir), "--sts", f"pairs={data['sts']}",
                                 "--sts-range", "0", "1"], capsys)
    assert code == 2 and "outside the score range [0, 1]" in err


@pytest.fixture(scope="module")
def fitted_checkpoint(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 1-step `codiemb fit` of the tiny model: its last.ckpt and its exported sentence-transformers folder."""
    run = tmp_path_factory.mktemp("fit")
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(run), "--data.val", "[]",
                 "--trainer.callbacks", "[]",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.dirpath", str(run / "ckpt"),
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.callbacks.dirpath", str(run / "model")])
    assert code == 0
    return next((run / "ckpt").glob("*.ckpt")), run / "model"


@pytest.mark.slow
def test_checkpoint_scores_like_its_exported_model(fitted_checkpoint, tiny_model_dir, data, tmp_path, capsys):
    checkpoint, exported = fitted_checkpoint
    results = {}
    for label, model in (("ckpt", checkpoint), ("export", exported), ("base", tiny_model_dir)):
        output = tmp_path / f"{label}.json"
        code, _, err = run_evaluate(["--model", str(model), "--sts", f"pairs={data['sts']}",
                                     "--ir", f"beir={data['beir']}", "--output", str(output)], capsys)
        assert code == 0, err
        results[label] = json.loads(output.read_text())
    for name in ("pairs", "beir"):
        assert results["ckpt"][name] == pytest.approx(results["export"][name], abs=1e-6)
    assert results["ckpt"]["pairs"] != pytest.approx(results["base"]["pairs"], abs=1e-9)   # trained weights were used


@pytest.mark.slow
def test_checkpoint_with_explicit_base_and_a_wrong_base(fitted_checkpoint, tiny_model_dir, data, tmp_path, capsys):
    checkpoint, _ = fitted_checkpoint
    code, out, err = run_evaluate(["--model", str(checkpoint), "--base", str(tiny_model_dir),
                                   "--sts", f"pairs={data['sts']}"], capsys)
    assert code == 0, err
    assert "cosine_spearman" in out

    one_layer = build_tiny_bert(tmp_path / "one_layer", layers=1)
    code, _, err = run_evaluate(["--model", str(checkpoint), "--base", str(one_layer),
                                 "--sts", f"pairs={data['sts']}", "--output", str(tmp_path / "never.json")], capsys)
    assert code == 2 and "weights do not fit" in err and not (tmp_path / "never.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--sts", "no_equals_sign"], "expected NAME=PATH"),
    ([], "no evaluation set given"),
    (["--sts", "x={sts}", "--sts", "x={sts}"], "two sets share this name"),
    (["--sts", "x={missing}"], "no such file or folder"),
    (["--ir", "x={sts}"], "retrieval evaluation needs a BEIR folder"),
    (["--sts", "x={sts}", "--batch-size", "0"], "must be at least 1"),
    (["--sts", "x={sts}", "--bogus"], "unrecognized arguments"),
    (["--sts", "x={sts}", "--device", "gpu0"], "not a torch device"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, data, tmp_path, capsys, args, message):
    output = tmp_path / "never.json"
    filled = [a.format(sts=data["sts"], missing=tmp_path / "missing.jsonl") for a in args]
    code, _, err = run_evaluate(["--model", str(tiny_model_dir), *filled, "--output", str(output)], capsys)
    errors = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not output.exists()


@pytest.mark.parametrize("model_args, message", [
    (["--model", "{tmp}/nothing.ckpt"], "no such checkpoint file"),
    (["--model", "{tmp}/not_a_model"], "no such model folder"),
    (["--model", "{tiny}", "--base", "{tiny}"], "only applies to a .ckpt"),
])
def test_bad_model_is_one_line_and_writes_nothing(tiny_model_dir, data, tmp_path, capsys, model_args, message):
    output = tmp_path / "never.json"
    filled = [a.format(tmp=tmp_path, tiny=tiny_model_dir) for a in model_args]
    code, _, err = run_evaluate([*filled, "--sts", f"x={data['sts']}", "--output", str(output)], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not output.exists()
