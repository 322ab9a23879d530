"""`codiemb test` (data.test scored exactly like validation, logged as test/...) and `codiemb predict`
(a file of texts -> .npy / .parquet embeddings), in-process on the tiny model, with their bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from codiemb_pl.cli.main import main

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
TEST_SETS = json.dumps([
    {"name": "sts_test", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "max_samples": 20},
    {"name": "ir_test", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_dev", "split": "dev", "max_samples": 8},
])
TEXTS = ["a short text", "a somewhat longer text about retrieval and similarity", "third"]


def run(command: str, tiny_model_dir: Path, root: Path, *extra: str) -> int:
    return main([command, "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(root), *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("codiemb: error: "), err
    return lines[0]


def reference_encoder(tiny_model_dir: Path):
    from codiemb_pl.model.encoder import TextEncoder

    return TextEncoder(str(tiny_model_dir), include_prompt=False)


# -- test ----------------------------------------------------------------------------------------------------
def test_test_scores_the_test_sets_like_the_evaluation_suite(tiny_model_dir, tmp_path):
    from codiemb_pl.data.eval_builders import build_eval_sets
    from codiemb_pl.data.sources import SourceConfig
    from codiemb_pl.evaluation.suite import evaluate_encoder

    code = run("test", tiny_model_dir, tmp_path, "--data.test", TEST_SETS,
               "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path))
    assert code == 0
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = {key: float(value) for row in rows for key, value in row.items() if key.startswith("test/") and value}
    sets = build_eval_sets([SourceConfig(**entry) for entry in json.loads(TEST_SETS)], where="data.test")
    per_set, summary = evaluate_encoder(reference_encoder(tiny_model_dir), sets)
    expected = {f"test/{name}/{metric}": value for name, values in per_set.items() for metric, value in values.items()}
    expected.update({f"test/{key}": value for key, value in summary.items()})
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-4), key
    assert not any(key.startswith("val/") for row in rows for key, value in row.items() if value)


def test_test_without_test_sets_is_one_line_and_no_banner(tiny_model_dir, tmp_path, capsys, caplog):
    assert run("test", tiny_model_dir, tmp_path / "run") == 2
    line = error_line(capsys)
    assert "data.test: no test sets configured" in line and "data.val" in line
    assert not [r for r in caplog.records if "Seed set to" in r.getMessage() or "GPU available" in r.getMessage()]


# -- predict -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_predict_writes_one_row_per_text_equal_to_encode(kind, tiny_model_dir, tmp_path):
    source = tmp_path / f"texts.{kind}"
    if kind == "txt":
        source.write_text("".join(text + "\n" for text in TEXTS))
        column = []
    elif kind == "jsonl":
        source.write_text("".join(json.dumps({"id": i, "sentence": t}) + "\n" for i, t in enumerate(TEXTS)))
        column = ["--data.predict_column", "sentence"]
    else:
        source.write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
        column = []
    output = tmp_path / "out" / "emb.npy"
    assert run("predict", tiny_model_dir, tmp_path, "--data.predict", str(source), *column,
               "--predict_output", str(output)) == 0
    embeddings = np.load(output)
    expected = reference_encoder(tiny_model_dir).encode(TEXTS).numpy()
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 32)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_predict_parquet_with_instruction_matches_encode_with_the_training_prefix(tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS))  # no final newline: the last line still counts
    output = tmp_path / "emb.parquet"
    assert run("predict", tiny_model_dir, tmp_path, "--data.predict", str(source), "--predict_output", str(output),
               "--data.predict_instruction", "Find the answer") == 0
    table = pq.read_table(output)
    assert table.column("text").to_pylist() == TEXTS
    embeddings = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    encoder = reference_encoder(tiny_model_dir)
    as_in_training = encoder.encode(TEXTS, prefix="Instruction: Find the answer Query: ").numpy()
    np.testing.assert_allclose(embeddings, as_in_training, atol=1e-5)
    assert not np.allclose(embeddings, encoder.encode(TEXTS).numpy(), atol=1e-3)  # the instruction matters


PREDICT_BAD_INPUTS = {
    "empty_line": ("texts.txt", "first\n\nthird\n", [], "emb.npy", ["texts.txt:2: empty text", "row i of the output"]),
    "missing_column": ("texts.jsonl", '{"sentence": "a"}\n', [], "emb.npy",
                       ["texts.jsonl:1: no column 'text'", "['sentence']", "--data.predict_column"]),
    "unknown_output_kind": ("texts.txt", "a\n", [], "emb.csv", ["--predict_output", "unknown output kind '.csv'",
                                                                ".npy or .parquet"]),
    "no_output": ("texts.txt", "a\n", [], None, ["--predict_output: no output file given"]),
    "missing_file": (None, None, [], "emb.npy", ["nothing.txt: no such file"]),
    "unknown_input_kind": ("texts.xml", "<a/>", [], "emb.npy", ["cannot tell the format from the extension '.xml'"]),
}


@pytest.mark.parametrize("case", sorted(PREDICT_BAD_INPUTS))
def test_predict_bad_input_is_one_line_and_leaves_the_output_alone(case, tiny_model_dir, tmp_path, capsys):
    name, content, extra, output_name, fragments = PREDICT_BAD_INPUTS[case]
    source = tmp_path / (name or "nothing.txt")
    if content is not None:
        source.write_text(content)
    output_args = []
    if output_name:
        output = tmp_path / output_name
        output.write_bytes(b"previous output")
        output_args = ["--predict_output", str(output)]
    assert run("predict", tiny_model_dir, tmp_path / "run", "--data.predict", str(source), *extra, *output_args) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    if output_name:
        assert output.read_bytes() == b"previous output"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_predict_without_texts_names_the_key(tiny_model_dir, tmp_path, capsys):
    assert run("predict", tiny_model_dir, tmp_path, "--predict_output", str(tmp_path / "e.npy")) == 2
    assert "data.predict: no file of texts to embed" in error_line(capsys)


def test_predict_on_two_ranks_writes_every_text_once_equal_to_encode(tiny_model_dir, tmp_path):
    """Two gloo ranks share the chunks (the last one padded by repetition); rank 0 writes the summed buffers."""
    import os
    import subprocess
    import sys

    from ddp_driver.launch import unused_port

    texts = [f"text number {i} " + "word " * i for i in range(5)]
    source = tmp_path / "texts.txt"
    source.write_text("".join(text + "\n" for text in texts))
    output = tmp_path / "emb.npy"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    env["MASTER_PORT"] = str(unused_port())   # none that another run of these tests holds
    result = subprocess.run(
        [sys.executable, "-m", "codiemb_pl", "predict", "--config", str(TINY_CONFIG),
         "--config", str(repo / "configs" / "trainer" / "ddp_cpu.yaml"), "--trainer.devices", "2",
         "--model.model_name_or_path", str(tiny_model_dir), "--trainer.default_root_dir", str(tmp_path / "run"),
         "--data.val_batch_size", "2", "--data.predict", str(source), "--predict_output", str(output)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    expected = reference_encoder(tiny_model_dir).encode(texts).numpy()
    np.testing.assert_allclose(np.load(output), expected, atol=1e-5)
    assert (result.stdout + result.stderr).count("[codiemb] wrote 5 embeddings") == 1
