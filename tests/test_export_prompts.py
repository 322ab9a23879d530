"""Training instructions survive export as sentence-transformers prompts, and exported folders load silently.

`SentenceTransformer(export).encode(q, prompt_name=NAME)` must equal the embedding training computed for
`q` with that sub-dataset's instruction (the module's forward on `tokenize_with_prefixes`), to 1e-5.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from codiemb_pl.callbacks.export import add_training_prompts, training_prompts
from codiemb_pl.cli import main
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.data.tokenize import instruction_prefix, tokenize_with_prefixes
from codiemb_pl.encoder import TextEncoder

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
QUERIES = ["why does steak turn brown in a hot pan", "tea", "how long does it take to caramelize onions at home"]
IR_INSTRUCTION, STS_INSTRUCTION = "Given a question, retrieve passages that answer it", "Rate how similar they are"


def training_embedding(folder: Path, texts: list[str], prefix: str, max_length: int = 32) -> torch.Tensor:
    """The embedding the training step computes: the encoder's forward on `prefix + text` with the
    instruction tokens marked out of pooling by the training tokenisation."""
    encoder = TextEncoder.load(folder)
    with torch.no_grad():
        return encoder(tokenize_with_prefixes(encoder.tokenizer, texts, max_length, [prefix] * len(texts)))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("prompts_run")
    train = json.dumps([
        {"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 24,
         "instruction": IR_INSTRUCTION},
        {"name": "demo_sts", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", "max_samples": 24,
         "instruction": STS_INSTRUCTION}])
    assert main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run), "--data.train", train,
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder"]) == 0
    return run / "model"


def test_export_names_one_prompt_per_instruction(exported):
    settings = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert settings["prompts"] == {"demo_ir": instruction_prefix(IR_INSTRUCTION),
                                   "demo_sts": instruction_prefix(STS_INSTRUCTION)}
    assert settings["prompts"]["demo_ir"] == f"Instruction: {IR_INSTRUCTION} Query: "
    pooling = json.loads((exported / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"] is False
    card = (exported / "README.md").read_text()
    assert "prompt_name='demo_ir'" in card and f"`demo_ir` = `Instruction: {IR_INSTRUCTION} Query: `" in card


@pytest.mark.parametrize("name,instruction", [("demo_ir", IR_INSTRUCTION), ("demo_sts", STS_INSTRUCTION)])
def test_sentence_transformers_prompt_name_gives_the_training_embedding(exported, name, instruction):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exported), device="cpu")
    prompted = model.encode(QUERIES, prompt_name=name, convert_to_tensor=True)
    expected = training_embedding(exported, QUERIES, instruction_prefix(instruction))
    assert torch.allclose(prompted, expected, atol=1e-5)
    # ... and the instruction matters: without the prompt, or with the prompt's tokens pooled, it differs
    assert not torch.allclose(model.encode(QUERIES, convert_to_tensor=True), expected, atol=1e-3)
    joined = [instruction_prefix(instruction) + query for query in QUERIES]
    assert not torch.allclose(model.encode(joined, convert_to_tensor=True), expected, atol=1e-3)
    # TextEncoder reads the same prompts back
    ours = TextEncoder.load(exported).encode(QUERIES, prompt_name=name)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_cls_pooling_keeps_the_cls_token_with_a_prompt(tiny_model_dir, tmp_path):
    """cls pooling takes [CLS] in training whatever the prefix; the export keeps `include_prompt: true`, the
    sentence-transformers setting that also takes [CLS] (with false it would take the first text token)."""
    encoder = TextEncoder(str(tiny_model_dir), pooling="cls", include_prompt=False)
    datamodule = SimpleNamespace(train_sources=[SourceConfig(name="qa", task="ir", path="x.jsonl",
                                                             instruction=IR_INSTRUCTION)],
                                 prefix_for=instruction_prefix)
    add_training_prompts(encoder, datamodule)
    encoder.save(tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / "1_Pooling" / "config.json").read_text())["include_prompt"] is True
    from sentence_transformers import SentenceTransformer

    prompted = SentenceTransformer(str(tmp_path / "cls"), device="cpu").encode(QUERIES, prompt_name="qa",
                                                                                convert_to_tensor=True)
    expected = training_embedding(tmp_path / "cls", QUERIES, instruction_prefix(IR_INSTRUCTION))
    assert torch.allclose(prompted, expected, atol=1e-5)


def test_training_prompts_share_one_prompt_per_instruction():
    sources = [SourceConfig(name="a", task="ir", path="a.jsonl", instruction="find it"),
               SourceConfig(name="b", task="sts", path="b.jsonl", instruction="find it"),
               SourceConfig(name="c", task="sts", path="c.jsonl"),
               SourceConfig(name="d", task="ir", path="d.jsonl", instruction="rank")]
    datamodule = SimpleNamespace(train_sources=sources, prefix_for=lambda i: f"<{i}> ")
    assert training_prompts(datamodule) == {"a": "<find it> ", "d": "<rank> "}
    assert training_prompts(SimpleNamespace(train_sources=[sources[2]], prefix_for=instruction_prefix)) == {}


REPORT_WORDS = ("LOAD REPORT", "MISSING", "newly initialized", "UNEXPECTED")


def test_loading_an_export_is_silent(exported, capfd, caplog):
    """No "BertModel LOAD REPORT ... pooler.dense.* MISSING ... newly initialized" from either loader."""
    from sentence_transformers import SentenceTransformer

    with caplog.at_level(logging.INFO):
        capfd.readouterr()
        TextEncoder.load(exported)
        ours = capfd.readouterr()
        SentenceTransformer(str(exported), device="cpu")
        theirs = capfd.readouterr()
    assert ours.out == "" and ours.err == ""
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for word in REPORT_WORDS:
        assert word not in theirs.out + theirs.err + logged, word
    settings = json.loads((exported / "sentence_bert_config.json").read_text())
    assert settings["model_args"] == {"add_pooling_layer": False}
