"""The layer beneath the commands (`codiemb_pl.workflows`): validation sets built one way, validation during
training and `codiemb evaluate` scoring alike on sets with an instruction, evaluation corpora that keep
empty documents while training data refuses them, and one-line argument errors."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main
from codiemb_pl.data.cache.records import opened_records
from codiemb_pl.data.eval_builders import build_eval_sets
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.workflows.evaluation import evaluate, load_sets
from codiemb_pl.workflows.mine import load_mining_inputs
from test_evaluate_command import data  # noqa: F401  (the fixture: an STS file and a BEIR folder)

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
INSTRUCTIONS = {"pairs": "find a sentence with the same meaning", "beir": "find the passage that answers"}


@pytest.fixture(scope="module")
def exported_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as `codiemb fit` exports it: prompt tokens left out of pooling (`include_prompt: false`)."""
    folder = tmp_path_factory.mktemp("export") / "model"
    TextEncoder(str(tiny_model_dir), include_prompt=False).save(folder)
    return folder


def validation_metrics(model: Path, val: list[dict], root: Path) -> dict[str, float]:
    """`codiemb validate` (the validation loop of training) on `val`, read back from its CSV log."""
    code = main(["validate", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model),
                 "--trainer.default_root_dir", str(root), "--data.val", json.dumps(val),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root)])
    assert code == 0
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    return {key: float(value) for row in rows for key, value in row.items() if key.startswith("val/") and value}


def test_validation_and_evaluate_give_the_same_numbers_on_sets_with_an_instruction(exported_model, data, tmp_path,
                                                                                   capsys):
    val = [{"name": "pairs", "task": "sts", "path": str(data["sts"]), "instruction": INSTRUCTIONS["pairs"]},
           {"name": "beir", "task": "ir", "path": str(data["beir"]), "split": "test",
            "instruction": INSTRUCTIONS["beir"]}]
    validated = validation_metrics(exported_model, val, tmp_path / "validate")

    output = tmp_path / "evaluate.json"
    code = main(["evaluate", "--model", str(exported_model), "--sts", f"pairs={data['sts']}",
                 "--ir", f"beir={data['beir']}", "--batch-size", "2", "--output", str(output),
                 *[f"--instruction={name}={text}" for name, text in INSTRUCTIONS.items()]])
    assert code == 0, capsys.readouterr().err
    evaluated = json.loads(output.read_text())
    compared = 0
    for name, metrics in evaluated.items():
        for metric, value in metrics.items():
            assert validated[f"val/{name}/{metric}"] == pytest.approx(value, abs=2e-6), (name, metric)
            compared += 1
    assert compared == 6

    plain = tmp_path / "plain.json"
    assert main(["evaluate", "--model", str(exported_model), "--sts", f"pairs={data['sts']}",
                 "--output", str(plain)]) == 0
    assert json.loads(plain.read_text())["pairs"]["cosine_pearson"] != \
        pytest.approx(evaluated["pairs"]["cosine_pearson"], abs=1e-6)      # the instruction is really applied


def test_validation_sets_apply_instructions_and_the_passage_prefix(data):
    sets = build_eval_sets([{"name": "pairs", "task": "sts", "path": str(data["sts"]), "instruction": "x"},
                                  SourceConfig("beir", "ir", str(data["beir"]), instruction="y")],
                                 instruction_template="<{instruction}> ", passage_prefix="passage: ")
    assert sets[0].prefixes == {"text1": "<x> ", "text2": "<x> "}
    assert sets[1].prefixes == {"query": "<y> ", "corpus": "passage: "}
    default = build_eval_sets([{"name": "b", "task": "ir", "path": str(data["beir"]), "instruction": "y"}],
                                    instruction_template=None, passage_prefix=None)[0]
    assert default.prefixes == {"query": "Instruction: y Query: ", "corpus": ""}


@pytest.mark.parametrize("entries, message", [
    ([["not", "a", "mapping"]], "evaluate[0]: expected a source mapping"),
    ([{"name": "a", "task": "sts", "path": "x", "polcy": 1}], "evaluate[0]: bad source"),
    ([{"name": "a", "task": "sts", "path": "{sts}"}, {"name": "a", "task": "sts", "path": "{sts}"}],
     "two sets share this name"),
])
def test_bad_source_lists_are_one_input_error(data, entries, message):
    filled = [{k: v.format(sts=data["sts"]) if isinstance(v, str) else v for k, v in e.items()}
              if isinstance(e, dict) else e for e in entries]
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_eval_sets(filled)


def test_evaluate_instruction_must_name_a_set(data):
    with pytest.raises(InputError, match="no --sts / --ir set is named 'other'"):
        load_sets([f"pairs={data['sts']}"], [], instructions=["other=find"])
    with pytest.raises(InputError, match="a second instruction for 'pairs'"):
        load_sets([f"pairs={data['sts']}"], [], instructions=["pairs=a", "pairs=b"])
    with pytest.raises(InputError, match="expected NAME=TEXT"):
        load_sets([f"pairs={data['sts']}"], [], instructions=["pairs"])


# -- evaluation corpora with empty documents --------------------------------------------------------------
@pytest.fixture(scope="module")
def empty_docs_beir(data, tmp_path_factory) -> Path:
    """`data`'s BEIR folder plus documents d7 (empty title and text, judged relevant to q1) and d8 (blank)."""
    folder = tmp_path_factory.mktemp("empty_docs") / "beir"
    shutil.copytree(data["beir"], folder)
    with (folder / "corpus.jsonl").open("a") as corpus:
        corpus.write(json.dumps({"_id": "d7", "title": "", "text": ""}) + "\n")
        corpus.write(json.dumps({"_id": "d8", "title": None, "text": "   "}) + "\n")
    with (folder / "qrels" / "test.tsv").open("a") as qrels:
        qrels.write("q1\td7\t1\n")
    return folder


def test_evaluate_keeps_empty_documents_and_warns_once(empty_docs_beir, tiny_model_dir, tmp_path, caplog, capsys):
    output = tmp_path / "results.json"
    with caplog.at_level(logging.WARNING, logger="codiemb_pl.data.beir"):
        code = main(["evaluate", "--model", str(tiny_model_dir), "--ir", f"beir={empty_docs_beir}",
                     "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if "empty title and text" in r.getMessage()]
    assert len(warnings) == 1 and "2 document(s)" in warnings[0] and "'d7'" in warnings[0]

    (vset,) = load_sets([], [f"beir={empty_docs_beir}"])
    corpus = dict(zip(vset.doc_ids, vset.texts["corpus"]))
    assert len(corpus) == 8 and corpus["d7"] == "" and corpus["d8"] == ""
    per_set, _ = evaluate(TextEncoder(str(tiny_model_dir)), [vset])
    assert json.loads(output.read_text())["beir"] == pytest.approx(per_set["beir"], abs=1e-6)
    assert 0.0 < per_set["beir"]["recall_at_100"] <= 1.0


def test_validation_keeps_empty_documents(empty_docs_beir, caplog):
    from codiemb_pl.data.datamodule import CoDiEmbDataModule

    module = CoDiEmbDataModule(val=[SourceConfig("beir", "ir", str(empty_docs_beir))])
    with caplog.at_level(logging.WARNING, logger="codiemb_pl.data.beir"):
        module.setup("validate")
    assert "" in module.val_sets[0].texts["corpus"] and len(module.val_sets[0].doc_ids) == 8
    assert sum("empty title and text" in r.getMessage() for r in caplog.records) == 1


def test_training_data_and_mining_refuse_empty_documents(empty_docs_beir):
    with pytest.raises(InputError, match="document 'd7' has an empty title and text"):
        with opened_records(SourceConfig("beir", "ir", str(empty_docs_beir), split="test")):
            pass
    with pytest.raises(InputError, match="document 'd7' has an empty title and text"):
        load_mining_inputs(empty_docs_beir, "test", None)


def test_mine_negatives_bad_arguments_are_one_line(tmp_path, capsys):
    code = main(["mine-negatives", str(tmp_path), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(errors) == 1 and "--model" in errors[0] and "codiemb mine-negatives --help" in errors[0]
    assert "usage:" not in err
