"""Model card: the text `build_model_card` writes, and the card inside a real export (loading unaffected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from codiemb_pl.cli.main import main
from codiemb_pl.model.card import build_model_card

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_lists_data_losses_fusion_metrics_and_usage():
    card = build_model_card(
        base_model="org/base-model", training_data=[{"name": "msmarco", "task": "ir", "path": "data/ms.jsonl",
                                                     "batch_size": 64}, {"name": "stsb", "task": "sts", "path": "x"}],
        sampler_policy="proportional", losses={"IR": {"temperature": 0.02}, "STS": "Pearson + rank-KL"},
        fusion={"method": "delta_guided", "checkpoints": ["epoch1", "epoch2"], "weights": [0.25, 0.75],
                "params": {"gamma": 1.0}},
        validation_metrics={"val/avg": 0.61234, "val/stsb/cosine_spearman": 0.8}, metrics_source="step 9",
        embedding_dim=384, pooling="mean", normalize=True, prompts={"query": "query: "},
        default_prompt_name="query", model_path="runs/x/model")
    meta = front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["base_model"] == "org/base-model"
    assert "| msmarco | ir | data/ms.jsonl | 64 |" in card and "`proportional`" in card
    assert "temperature = 0.0200" in card and "Pearson + rank-KL" in card
    assert "Method: `delta_guided`" in card and "| epoch2 | 0.7500 |" in card and "gamma = 1.0000" in card
    assert "| `val/avg` | 0.6123 |" in card and "Measured on step 9" in card
    assert "`query` = `query: `" in card and "model.encode_query([" in card and "`query` (`encode_query`)" in card
    assert "SentenceTransformer('runs/x/model')" in card


def test_card_without_fusion_or_validation_says_so():
    card = build_model_card(base_model="m")
    assert "## Fusion" not in card and "No validation set was configured." in card


def test_fusion_weights_given_by_name():
    card = build_model_card(base_model="m", fusion={"method": "uniform_soup", "weights": {"a": 0.5, "b": 0.5}})
    assert "| a | 0.5000 |" in card and "| b | 0.5000 |" in card


@pytest.fixture(scope="module")
def exported_model(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("card_run")
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run), "--trainer.val_check_interval", "2",
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.callbacks.dirpath", str(run / "model")])
    assert code == 0
    return run / "model"


def test_export_carries_a_card_with_base_model_data_and_the_exported_metrics(exported_model, tiny_model_dir):
    card = (exported_model / "README.md").read_text()
    assert front_matter(card)["base_model"] == str(tiny_model_dir)
    assert "| demo_ir | ir | pkg://codiemb_pl/demo/ir_train.jsonl |" in card
    assert "Sampler policy: `proportional`" in card and "multi-positive InfoNCE" in card
    best = next(exported_model.parent.rglob("epoch=*.ckpt"))
    step = torch.load(best, map_location="cpu", weights_only=False)["global_step"]
    assert f"at step {step} (the exported weights)" in card
    for key in ("val/avg", "val/demo_ir_dev/ndcg_at_10", "val/demo_sts_dev/cosine_spearman"):
        assert f"| `{key}` |" in card


def test_card_leaves_loading_unaffected(exported_model):
    from sentence_transformers import SentenceTransformer

    from codiemb_pl.model.encoder import TextEncoder

    metadata = json.loads((exported_model / "config_sentence_transformers.json").read_text())
    assert metadata["similarity_fn_name"] == "cosine" and "prompts" in metadata
    model = SentenceTransformer(str(exported_model), device="cpu")
    texts = ["a sentence", "another, longer sentence"]
    expected = TextEncoder(str(exported_model)).encode(texts)
    assert torch.allclose(model.encode(texts, convert_to_tensor=True), expected, atol=1e-5)


def test_card_after_a_resume_keeps_the_validation_table(exported_model, tiny_model_dir, tmp_path):
    """A run resumed from last.ckpt that does not validate again before fit ends still knows what validation
    measured (the module's validation history travels in the checkpoint), so its card keeps the table."""
    last = exported_model.parent / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    resumed = tmp_path / "resumed"
    assert main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(resumed), "--trainer.max_steps", "5",
                 "--trainer.val_check_interval", "1.0",   # no validation before fit ends
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", "--ckpt_path", str(last)]) == 0
    card = (resumed / "model" / "README.md").read_text()
    assert "No validation set was configured" not in card
    best = next(state["best_model_path"] for key, state in saved["callbacks"].items() if "ModelCheckpoint" in key)
    step = torch.load(best, map_location="cpu", weights_only=False)["global_step"]
    assert f"at step {step} (the exported weights)" in card
    history = saved["codiemb_validation_history"]
    assert all(type(value) is float for _, metrics in history for value in metrics.values())  # plain types
    assert f"| `val/avg` | {dict(history)[f'step {step}']['val/avg']:.4f} |" in card
