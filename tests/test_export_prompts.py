"""Training instructions survive export as sentence-transformers prompts, and exported folders load silently.

`SentenceTransformer(export).encode(q, prompt_name=NAME)` must equal the embedding training computed for
`q` with that sub-dataset's instruction (the module's forward on `tokenize_texts`), to 1e-5.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from codiemb_pl.callbacks.export import add_training_prompts, training_prompts
from codiemb_pl.cli.main import main
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.data.collate import tokenize_texts
from codiemb_pl.data.instructions import instruction_prefix
from codiemb_pl.model.encoder import TextEncoder

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
QUERIES = ["why does steak turn brown in a hot pan", "tea", "how long does it take to caramelize onions at home"]
IR_INSTRUCTION, STS_INSTRUCTION = "Given a question, retrieve passages that answer it", "Rate how similar they are"


def training_embedding(folder: Path, texts: list[str], prefix: str, max_length: int = 32) -> torch.Tensor:
    """The embedding the training step computes: the encoder's forward on `prefix + text` with the
    instruction tokens marked out of pooling by the training tokenisation."""
    encoder = TextEncoder.load(folder)
    with torch.no_grad():
        return encoder(tokenize_texts(encoder.tokenizer, texts, max_length, [prefix] * len(texts)))


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
                                   "demo_sts": instruction_prefix(STS_INSTRUCTION),
                                   "query": instruction_prefix(IR_INSTRUCTION)}
    assert settings["prompts"]["demo_ir"] == f"Instruction: {IR_INSTRUCTION} Query: "
    assert settings["default_prompt_name"] is None   # plain `encode` stays prompt-free, as training's documents
    pooling = json.loads((exported / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"] is False
    card = (exported / "README.md").read_text()
    assert "model.encode_query([" in card and f"`demo_ir` = `Instruction: {IR_INSTRUCTION} Query: `" in card


def test_encode_query_and_prompt_name_query_use_the_ir_instruction(exported):
    """What sentence-transformers users call: `encode_query` and `prompt_name="query"` give the embedding
    training computed with the IR instruction (before, the prompt was only named `demo_ir`, so both silently
    encoded without it); `encode_document` adds nothing (no passage prefix was configured)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exported), device="cpu")
    expected = training_embedding(exported, QUERIES, instruction_prefix(IR_INSTRUCTION))
    assert torch.allclose(model.encode_query(QUERIES, convert_to_tensor=True), expected, atol=1e-5)
    assert torch.allclose(model.encode(QUERIES, prompt_name="query", convert_to_tensor=True), expected, atol=1e-5)
    plain = training_embedding(exported, QUERIES, "")
    assert torch.allclose(model.encode_document(QUERIES, convert_to_tensor=True), plain, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)   # the instruction changes the embedding


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
    assert training_prompts(datamodule) == {"a": "<find it> ", "d": "<rank> ", "query": "<find it> "}
    assert training_prompts(SimpleNamespace(train_sources=[sources[2]], prefix_for=instruction_prefix)) == {}


def test_query_is_the_first_ir_instruction_in_config_order_and_document_the_passage_prefix():
    sts = SourceConfig(name="sim", task="sts", path="s.jsonl", instruction="compare")
    first_ir = SourceConfig(name="qa", task="ir", path="q.jsonl", instruction="answer")
    second_ir = SourceConfig(name="web", task="ir", path="w.jsonl", instruction="search the web")
    plain_ir = SourceConfig(name="plain", task="ir", path="p.jsonl")
    datamodule = SimpleNamespace(train_sources=[sts, plain_ir, first_ir, second_ir], prefix_for=lambda i: f"<{i}> ",
                                 hparams=SimpleNamespace(passage_prefix="passage: "))
    assert training_prompts(datamodule) == {"sim": "<compare> ", "qa": "<answer> ", "web": "<search the web> ",
                                            "query": "<answer> ", "document": "passage: "}
    datamodule.train_sources = [second_ir, first_ir]      # the order decides
    assert training_prompts(datamodule)["query"] == "<search the web> "
    datamodule.train_sources, datamodule.hparams.passage_prefix = [sts], ""   # STS instructions are not `query`
    assert training_prompts(datamodule) == {"sim": "<compare> "}


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


def test_codiemb_fuse_keeps_the_members_prompts_and_pooling(exported, tiny_model_dir, tmp_path):
    """A hand-fused model (`codiemb fuse` against the bare base model, which knows no instruction and pools
    prompts) takes its members' prompts and `include_prompt`, so `encode_query` still reproduces training; a
    member that declares other prompts is named in one line."""
    from sentence_transformers import SentenceTransformer

    from codiemb_pl.workflows.fusion.fuse import fuse

    other = tmp_path / "other"
    shutil.copytree(exported, other)
    settings_file = other / "config_sentence_transformers.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "prompts": {"query": "q: "}}))
    logged: list[str] = []
    fuse(str(tiny_model_dir), [{"path": str(exported)}, {"path": str(other)}], "uniform_soup", tmp_path / "fused",
         log=logged.append)
    fused = tmp_path / "fused"
    own = json.loads((exported / "config_sentence_transformers.json").read_text())["prompts"]
    assert json.loads((fused / "config_sentence_transformers.json").read_text())["prompts"] == own
    assert json.loads((fused / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    assert [line for line in logged if "members declare different prompts" in line and str(other) in line]
    model = SentenceTransformer(str(fused), device="cpu")
    expected = training_embedding(fused, QUERIES, instruction_prefix(IR_INSTRUCTION))
    assert torch.allclose(model.encode_query(QUERIES, convert_to_tensor=True), expected, atol=1e-5)
    assert f"`query` = `{instruction_prefix(IR_INSTRUCTION)}`" in (fused / "README.md").read_text()


def test_checkpoint_fusion_gives_the_encoder_it_exports_the_training_prompts(tiny_model_dir):
    """The CheckpointFusion winner is saved from the module's encoder: it gets the prompts at fit start even
    without an ExportEncoder in the run."""
    from codiemb_pl.callbacks import CheckpointFusion

    encoder = TextEncoder(str(tiny_model_dir), include_prompt=False)
    datamodule = SimpleNamespace(train_sources=[SourceConfig(name="qa", task="ir", path="x.jsonl",
                                                             instruction=IR_INSTRUCTION)],
                                 prefix_for=instruction_prefix, hparams=SimpleNamespace(passage_prefix=""))
    CheckpointFusion().on_fit_start(SimpleNamespace(datamodule=datamodule), SimpleNamespace(encoder=encoder))
    assert encoder.prompts == {"qa": instruction_prefix(IR_INSTRUCTION), "query": instruction_prefix(IR_INSTRUCTION)}
    assert encoder.include_prompt is False


def test_sweep_export_keeps_the_members_prompt_settings(tiny_model_dir, tmp_path):
    """A sweep scores with `include_prompt=False` (as validation pools); its export takes the runs' own setting
    (True for cls pooling), so `encode_query` of the exported folder reproduces training."""
    from sentence_transformers import SentenceTransformer

    from codiemb_pl.workflows.fusion.export import export_candidate
    from codiemb_pl.workflows.fusion.leaderboard import Candidate, Leaderboard
    from codiemb_pl.workflows.fusion.scoring import FusionInputs

    run_model = tmp_path / "out" / "runs" / "a" / "model"
    member = TextEncoder(str(tiny_model_dir), pooling="cls", include_prompt=False)
    add_training_prompts(member, SimpleNamespace(train_sources=[SourceConfig(name="qa", task="ir", path="x.jsonl",
                                                                             instruction=IR_INSTRUCTION)],
                                                 prefix_for=instruction_prefix))
    member.save(run_model)
    candidate = Candidate("a", "checkpoint", weights_path=str(run_model / "model.safetensors"), metrics={"val/avg": 0.5})
    inputs = FusionInputs(run_model / "model.safetensors", [("a", run_model / "model.safetensors")],
                          model_folder=str(tiny_model_dir))
    scoring = TextEncoder(str(run_model), include_prompt=False)   # as fuse_sweep builds it
    folder = export_candidate(Leaderboard([candidate]), inputs, scoring, candidate, tmp_path / "out" / "model",
                              merge_facts={}, prompt_folders=[("a", run_model)], log=lambda _: None)
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["include_prompt"] is True
    model = SentenceTransformer(str(folder), device="cpu")
    expected = training_embedding(folder, QUERIES, instruction_prefix(IR_INSTRUCTION))
    assert torch.allclose(model.encode_query(QUERIES, convert_to_tensor=True), expected, atol=1e-5)
