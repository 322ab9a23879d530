"""Learning from a teacher (SPEC §10, issue 23): IR score distillation, STS target blending, embedding distillation
with a projection, teacher scores in the data and from an online teacher (bi- or cross-encoder), `model.num_layers`.

Losses against hand-computed values; teacher scores travelling with the sampled candidates through the token
path; bad teacher-score records rejected with file:line; gradients with the gradient cache equal those without;
one in-process fit (logs per part, model card, a cut student exported); 2 gloo ranks equal one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from codiemb_pl.data.cache.dataset import ArrowTrainingDataset
from codiemb_pl.data.cache.records import open_records, text_id
from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.collate import PaddingRule, TokenCollator
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.losses.distillation import (DistillationConfig, blended_sts_targets, candidate_kl_divergence,
                                            embedding_distillation_loss, text_weights)
from codiemb_pl.model.teacher import TeacherSettings, load_teacher
from codiemb_pl.training.module import CoDiEmbModule
from codiemb_pl.training.teacher_signal import teacher_signal
from ddp_driver.launch import RunPool, model_without_dropout, write_jsonl

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


# -- fixtures: a student without dropout, a wider bi-encoder teacher, a random cross-encoder ---------------------
@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return model_without_dropout(tiny_model_dir, tmp_path_factory.mktemp("student") / "model")


def save_tiny(folder: Path, *, hidden: int, cross_encoder: bool = False, seed: int = 3) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from conftest import minilm_path

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(config) if cross_encoder else BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("teacher"), hidden=48)


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("cross"), hidden=32, cross_encoder=True)


# -- the losses --------------------------------------------------------------------------------------------------
def test_kl_equals_the_hand_computed_value():
    # p_T = softmax([2, 1, 0]) = [0.665241, 0.244728, 0.090031], log p_T = [2, 1, 0] - 2.407606;
    # log p_S = [1, 0, 0.5] - 1.680270; log p_T - log p_S = [0.272664, 0.272664, -1.227336]
    # KL = 0.665241·0.272664 + 0.244728·0.272664 - 0.090031·1.227336 = 0.137618; a query without scores adds 0
    student = torch.tensor([[1.0, 0.0, 0.5], [0.3, 0.2, 0.1]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [math.nan] * 3])
    loss = candidate_kl_divergence(student, teacher, student_temperature=1.0, teacher_temperature=1.0)
    assert loss.item() == pytest.approx(0.137618 / 2, abs=1e-6)
    # temperatures divide the scores: the same distributions from scaled scores
    scaled = candidate_kl_divergence(student[:1] * 0.05, teacher[:1] * 3.0, student_temperature=0.05,
                                     teacher_temperature=3.0)
    assert scaled.item() == pytest.approx(0.137618, abs=1e-6)


def test_kl_leaves_out_padding_slots():
    student, teacher = torch.tensor([[1.0, 0.0, 0.5, 9.0]]), torch.tensor([[2.0, 1.0, 0.0, -4.0]])
    mask = torch.tensor([[True, True, True, False]])
    masked = candidate_kl_divergence(student, teacher, mask=mask, student_temperature=1.0, teacher_temperature=1.0)
    assert masked.item() == pytest.approx(0.137618, abs=1e-6)
    student.requires_grad_(True)
    candidate_kl_divergence(student, teacher, mask=mask, student_temperature=1.0, teacher_temperature=1.0).backward()
    assert student.grad[0, 3] == 0 and torch.isfinite(student.grad).all()


def test_sts_targets_blend_gold_and_teacher():
    gold = torch.tensor([0.8, 0.2, 0.6, 0.4])
    teacher = torch.tensor([0.4, math.nan, 0.9, 0.1])
    has_gold = torch.tensor([True, True, True, False])   # pair 3: a teacher score only (its "gold" slot holds 0.4)
    targets = blended_sts_targets(gold, teacher, 0.25, has_gold)
    torch.testing.assert_close(targets, torch.tensor([0.75 * 0.8 + 0.25 * 0.4, 0.2, 0.75 * 0.6 + 0.25 * 0.9, 0.1]))


def test_embedding_distillation_mse_and_cosine():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_distillation_loss(student, teacher, "mse").item() == pytest.approx((2.0 + 1.0) / 2)
    assert embedding_distillation_loss(student, teacher, "cosine").item() == pytest.approx((1.0 + 0.0) / 2)
    # each query's own texts averaged, padding slots out: query 0 has 1 + 1 + 1 real texts, query 1 has 1 + 1 + 2
    weights = text_weights(2, {"query": 2, "positives": 2, "negatives": 4}, torch.tensor([[True, False], [True, True]]))
    assert weights["query"].tolist() == pytest.approx([1 / 6, 1 / 8])
    assert weights["negatives"].tolist() == pytest.approx([1 / 6, 0.0, 1 / 8, 1 / 8])
    assert sum(w.sum() for w in weights.values()).item() == pytest.approx(1.0)


def test_distillation_settings_are_checked():
    with pytest.raises(InputError, match="embedding_weight: embedding distillation needs an online teacher"):
        DistillationConfig(embedding_weight=1.0)
    with pytest.raises(InputError, match="sts_weight"):
        DistillationConfig(sts_weight=1.5)
    with pytest.raises(InputError, match="scores_from: is `teacher` but no teacher"):
        DistillationConfig(scores_from="teacher")


# -- the data path -------------------------------------------------------------------------------------------------
def score_of(text: str) -> float:
    """The teacher score the test data gives a text (so a chosen candidate's score can be checked by its text)."""
    return (text_id(text) % 1000) / 100.0


def ir_rows(count: int = 6) -> list[dict]:
    rows = []
    for index in range(count):
        positives = [f"answer {index} one", f"answer {index} two"][: 1 + index % 2]
        negatives = [f"wrong {index} {k}" for k in range(index % 4)]          # 0 to 3 negatives: padding and re-draws
        rows.append({"query": f"question {index}", "positives": positives, "negatives": negatives,
                     "teacher_scores": [score_of(text) for text in positives + negatives]})
    return rows


def collated(folder: Path, sources: list[SourceConfig], tokenizer, indices: list[int], **collator) -> dict:
    dataset = ArrowTrainingDataset(sources, [""] * len(sources), seed=5, cache_dir=folder, with_texts=True)
    dataset.tokenize(tokenizer, TokenLimits(32, 32, 32))
    return TokenCollator(PaddingRule.of(tokenizer), **collator)([dataset[(index, 0)] for index in indices])


def test_teacher_scores_travel_with_the_chosen_candidates(tmp_path, student_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    source = SourceConfig(name="ir", task="ir", path=str(write_jsonl(tmp_path / "ir.jsonl", ir_rows())))
    batch = collated(tmp_path / "cache", [source], tokenizer, list(range(6)), n_positives=2, n_negatives=3)
    id_to_text = {text_id(t): t for row in ir_rows() for t in row["positives"] + row["negatives"]}
    scores, mask = batch["teacher_scores"], batch["negative_mask"]
    assert scores.shape == (6, 5)
    for i in range(6):
        chosen = batch["positive_ids"][i].tolist() + batch["negative_ids"][i].tolist()
        for slot, identifier in enumerate(chosen):
            if slot < 2 or mask[i, slot - 2]:
                assert scores[i, slot].item() == pytest.approx(score_of(id_to_text[identifier]), abs=1e-5)
        # the texts an online teacher reads are the chosen ones, in the same order
        assert batch["texts"]["positives"][2 * i:2 * i + 2] == [id_to_text[k] for k in chosen[:2]]
        assert [text_id(t) for t in batch["texts"]["negatives"][3 * i:3 * i + 3]] == chosen[2:]
    assert not mask.all()   # padding slots were exercised
    # the records table gives the scores back to mining / BOOM subsets (json_rows) and to inspection
    records = open_records(source, tmp_path / "cache")
    assert [row["teacher_scores"] for row in records.json_rows(range(6))] == [row["teacher_scores"] for row in ir_rows()]
    assert records.record(2).teacher_scores == tuple(ir_rows()[2]["teacher_scores"])


def test_sts_pairs_with_a_teacher_score_only_train_on_it(tmp_path, student_dir):
    from transformers import AutoTokenizer

    rows = [{"text1": "a cat", "text2": "a kitten", "score": 4.0, "teacher_score": 0.9},
            {"text1": "a car", "text2": "a tree", "teacher_score": 0.1},
            {"text1": "rain", "text2": "storm", "score": 3.0}]
    source = SourceConfig(name="sts", task="sts", path=str(write_jsonl(tmp_path / "sts.jsonl", rows)))
    batch = collated(tmp_path / "cache", [source], AutoTokenizer.from_pretrained(str(student_dir)), [0, 1, 2])
    torch.testing.assert_close(batch["scores"], torch.tensor([0.8, 0.1, 0.6]))
    assert batch["gold_mask"].tolist() == [True, False, True]
    assert batch["teacher_scores"][:2].tolist() == pytest.approx([0.9, 0.1]) and batch["teacher_scores"][2].isnan()
    assert batch["texts"] == {"text1": ["a cat", "a car", "rain"], "text2": ["a kitten", "a tree", "storm"]}


BAD_RECORDS = {
    "too_few": ({"query": "q", "positives": ["p"], "negatives": ["n1", "n2"], "teacher_scores": [0.5, 0.1]},
                "teacher_scores has 2 scores for 1 positives \\+ 2 negatives"),
    "too_many": ({"query": "q", "positives": ["p"], "teacher_scores": [0.5, 0.1]},
                 "teacher_scores has 2 scores for 1 positives \\+ 0 negatives"),
    "not_a_number": ({"query": "q", "positives": ["p"], "teacher_scores": ["high"]}, "teacher score 'high' is not"),
    "not_a_list": ({"query": "q", "positives": ["p"], "teacher_scores": 0.5}, "teacher_scores must be a list"),
    "sts_outside_unit": ({"text1": "a", "text2": "b", "teacher_score": 1.5}, "teacher_score 1.5 is outside \\[0, 1\\]"),
    "sts_no_score": ({"text1": "a", "text2": "b"}, "missing field 'score'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_teacher_score_records_are_refused_with_file_and_line(tmp_path, case):
    bad, message = BAD_RECORDS[case]
    task = "sts" if "text1" in bad else "ir"
    good = {"text1": "x", "text2": "y", "score": 1.0} if task == "sts" else \
        {"query": "ok", "positives": ["p1", "p2"], "negatives": ["n"], "teacher_scores": [1, 0.5, -2]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad, good])
    with pytest.raises(InputError, match=f"train.jsonl:3: {message}"):
        open_records(SourceConfig(name="d", task=task, path=str(path)), tmp_path / "cache")


def test_bad_teacher_scores_in_a_csv_cell(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('query,positives,negatives,teacher_scores\nq,p,n,"[0.9, 0.1]"\nq2,p2,n2,"[0.3]"\n')
    with pytest.raises(InputError, match="train.csv:3: teacher_scores has 1 scores for 1 positives"):
        open_records(SourceConfig(name="d", task="ir", path=str(path)), tmp_path / "cache")


# -- the teacher -------------------------------------------------------------------------------------------------
def texts_batch(task: str) -> dict:
    if task == "sts":
        return {"task": "sts", "texts": {"text1": ["a cat sleeps", "rain falls"], "text2": ["a kitten naps", "sun"]}}
    return {"task": "ir", "texts": {"query": ["what is tea", "who wrote it"],
                                    "positives": ["tea is a drink", "an author wrote it"],
                                    "negatives": ["coffee", "a car", "the sea", "a book"]}}


def test_bi_encoder_teacher_scores_are_its_cosines_over_each_querys_own_candidates(teacher_dir):
    teacher = load_teacher(TeacherSettings(str(teacher_dir), batch_size=2))
    assert teacher.kind == "bi_encoder" and teacher.embedding_dim == 48
    signal = teacher_signal(teacher, texts_batch("ir"), scores=True, embeddings=True)
    encode = lambda texts: torch.nn.functional.normalize(teacher.encoder.encode(texts), dim=-1)  # noqa: E731
    queries, documents = encode(["what is tea", "who wrote it"]), encode(texts_batch("ir")["texts"]["positives"]
                                                                         + texts_batch("ir")["texts"]["negatives"])
    expected = torch.stack([documents[[0, 2, 3]] @ queries[0], documents[[1, 4, 5]] @ queries[1]])
    torch.testing.assert_close(signal["teacher_scores"], expected, rtol=1e-5, atol=1e-6)
    assert signal["teacher_embeddings"]["negatives"].shape == (4, 48)
    sts = teacher_signal(teacher, texts_batch("sts"), scores=True, embeddings=False)
    cosines = (encode(["a cat sleeps", "rain falls"]) * encode(["a kitten naps", "sun"])).sum(-1)
    torch.testing.assert_close(sts["teacher_scores"], cosines.clamp(0, 1), rtol=1e-5, atol=1e-6)


def test_cross_encoder_teacher_scores_are_its_logits(cross_encoder_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = load_teacher(TeacherSettings(str(cross_encoder_dir), batch_size=3, max_seq_length=16))
    assert teacher.kind == "cross_encoder"
    signal = teacher_signal(teacher, texts_batch("ir"), scores=True, embeddings=False)
    model = AutoModelForSequenceClassification.from_pretrained(str(cross_encoder_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder_dir))
    pairs = [("what is tea", "tea is a drink"), ("what is tea", "coffee"), ("what is tea", "a car"),
             ("who wrote it", "an author wrote it"), ("who wrote it", "the sea"), ("who wrote it", "a book")]
    with torch.no_grad():
        logits = model(**tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True,
                                   max_length=16, return_tensors="pt")).logits[:, 0]
    torch.testing.assert_close(signal["teacher_scores"], logits.view(2, 3), rtol=1e-5, atol=1e-5)
    sts = teacher_signal(teacher, texts_batch("sts"), scores=True, embeddings=False)["teacher_scores"]
    assert ((sts > 0) & (sts < 1)).all()   # logits through a sigmoid


def test_a_python_api_checkpoint_with_distillation_settings_loads_weights_only(tmp_path):
    """The Python API stores the settings objects in the hyper-parameters: the safe loader allows them."""
    from codiemb_pl.fusion.sources import load_lightning_checkpoint

    settings = DistillationConfig(ir_weight=0.5, teacher=TeacherSettings("some/teacher", batch_size=8))
    torch.save({"hyper_parameters": {"distillation": settings, "num_layers": [0, 2]}, "state_dict": {}},
               tmp_path / "api.ckpt")
    loaded = load_lightning_checkpoint(tmp_path / "api.ckpt")["hyper_parameters"]
    assert loaded["distillation"] == settings and loaded["num_layers"] == [0, 2]


def test_embedding_distillation_refuses_a_cross_encoder(student_dir, cross_encoder_dir):
    with pytest.raises(InputError, match="cross-encoder"):
        CoDiEmbModule(str(student_dir), distillation=DistillationConfig(
            embedding_weight=1.0, teacher=TeacherSettings(str(cross_encoder_dir))))


# -- the module: gradient cache, online teacher per step -----------------------------------------------------------
def ir_batch(module: CoDiEmbModule) -> dict:
    texts = texts_batch("ir")["texts"]
    queries = texts["query"] + ["what is a sea", "a fourth question"]
    positives = texts["positives"] + ["the sea is water", "the fourth answer"]
    negatives = texts["negatives"] + ["a lake", "a pond", "a cat", "a dog"]
    tokenize = module.encoder.tokenize
    return {"task": "ir", "dataset": "d", "query": tokenize(queries), "positives": tokenize(positives),
            "negatives": tokenize(negatives), "negative_mask": torch.tensor([[True, False]] + [[True, True]] * 3),
            "positive_ids": torch.arange(4).view(4, 1), "negative_ids": 10 + torch.arange(8).view(4, 2),
            "teacher_scores": torch.tensor([[0.9, 0.2, 0.0], [0.7, 0.5, 0.1], [0.8, 0.3, 0.4], [0.6, 0.6, 0.2]]),
            "texts": {"query": queries, "positives": positives, "negatives": negatives}}


def sts_batch(module: CoDiEmbModule) -> dict:
    first, second = ["a cat sleeps", "rain falls", "a man runs", "two dogs"], ["a kitten naps", "sun", "he runs", "x"]
    return {"task": "sts", "dataset": "s", "text1": module.encoder.tokenize(first),
            "text2": module.encoder.tokenize(second), "scores": torch.tensor([0.9, 0.1, 0.5, 0.5], dtype=torch.float64),
            "gold_mask": torch.tensor([True, True, True, False]),
            "teacher_scores": torch.tensor([0.8, math.nan, 0.6, 0.5]), "texts": {"text1": first, "text2": second}}


GRAD_CASES = {   # (distillation settings, batch)
    "ir_data_scores_and_projected_embeddings": (dict(ir_weight=0.5, embedding_weight=0.3, scores_from="data"),
                                                ir_batch),
    "ir_online_scores": (dict(ir_weight=1.0), ir_batch),
    "sts_online_blend_cosine_embeddings": (dict(sts_weight=0.5, embedding_weight=0.2, embedding_loss="cosine"),
                                           sts_batch),
}


def module_grads(module: CoDiEmbModule, batch: dict) -> tuple[float, dict]:
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_with_the_gradient_cache_equal_those_without(student_dir, teacher_dir, case):
    settings, make_batch = GRAD_CASES[case]
    config = DistillationConfig(**settings, teacher=TeacherSettings(str(teacher_dir)))
    plain, cached = (CoDiEmbModule(str(student_dir), ir_temperature=0.05, grad_cache_chunk_size=chunk,
                                   distillation=config).double().train() for chunk in (0, 3))
    cached.load_state_dict(plain.state_dict())
    batch = make_batch(plain)
    (plain_loss, plain_grads), (cached_loss, cached_grads) = module_grads(plain, batch), module_grads(cached, batch)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-9)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 20
    assert ("embedding_projection.weight" in plain_grads) == bool(settings.get("embedding_weight"))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # the distillation terms are really in the loss: without them the value differs
    undistilled = CoDiEmbModule(str(student_dir), ir_temperature=0.05).double().train()
    undistilled.load_state_dict(plain.state_dict(), strict=False)
    assert module_grads(undistilled, batch)[0] != pytest.approx(plain_loss, rel=1e-6)


def test_the_online_teacher_runs_on_every_steps_texts(student_dir, teacher_dir, monkeypatch):
    module = CoDiEmbModule(str(student_dir), distillation=DistillationConfig(
        ir_weight=1.0, teacher=TeacherSettings(str(teacher_dir)))).train()
    seen = []
    embed = module.teacher.embed
    monkeypatch.setattr(module.teacher, "embed", lambda texts, role="query": seen.append(list(texts)) or embed(texts, role))
    first = ir_batch(module)
    second = {**first, "texts": {**first["texts"], "query": ["another question"] * 4}}
    module.training_step(first, 0)
    module.training_step(second, 1)
    assert [group[0] for group in seen[0::3]] == ["what is tea", "another question"]   # no cache across steps


def test_a_lora_decoder_student_learns_from_the_teacher_and_checkpoints_its_projection(teacher_dir, tmp_path):
    """Decoder backbone (left padding, last-token pooling) cut to its first block, LoRA adapters: the KD and
    embedding terms reach the adapters and the projection, and the adapters-only checkpoint keeps the projection."""
    from decoder_models import build_tiny_decoder

    from codiemb_pl.model.lora import LoraSettings

    decoder = build_tiny_decoder(tmp_path / "qwen2", "qwen2", layers=2)
    module = CoDiEmbModule(str(decoder), num_layers=1, lora=LoraSettings(r=2, alpha=4.0, dropout=0.0),
                           distillation=DistillationConfig(ir_weight=1.0, embedding_weight=0.5,
                                                           teacher=TeacherSettings(str(teacher_dir)))).train()
    assert module.encoder.num_layers == 1 and module.encoder.tokenizer.padding_side == "left"
    _, grads = module_grads(module, ir_batch(module))
    assert "embedding_projection.weight" in grads and any(".lora_B." in name for name in grads)
    assert all(".lora_" in name or name == "embedding_projection.weight" for name in grads)   # the base is frozen
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "embedding_projection.weight" in checkpoint["state_dict"]
    module.on_load_checkpoint(checkpoint)   # the adapters-only check accepts it


# -- model.num_layers ---------------------------------------------------------------------------------------------
def test_num_layers_keeps_the_chosen_blocks(tmp_path):
    from conftest import build_tiny_bert
    from decoder_models import build_tiny_decoder

    from codiemb_pl.model.encoder import TextEncoder

    bert = build_tiny_bert(tmp_path / "bert", layers=4)
    full = TextEncoder(str(bert))
    cut = TextEncoder(str(bert), num_layers=[1, 3])
    assert cut.num_layers == 2 and cut.kept_layers == [1, 3] and len(cut.model.encoder.layer) == 2
    for new, old in ((0, 1), (1, 3)):
        assert torch.equal(cut.model.encoder.layer[new].output.dense.weight, full.model.encoder.layer[old].output.dense.weight)
    assert TextEncoder(str(bert), num_layers=2).kept_layers == [0, 1]
    from codiemb_pl.model.layers import select_layer_state   # the same cut on a base's weights (a LoRA .ckpt's base)

    cut_state = select_layer_state(full.model.state_dict(), [1, 3])
    assert cut_state.keys() == cut.model.state_dict().keys()
    assert all(torch.equal(value, cut.model.state_dict()[key]) for key, value in cut_state.items())
    decoder = build_tiny_decoder(tmp_path / "qwen2", "qwen2", layers=3)
    student = TextEncoder(str(decoder), num_layers=[0, 2])
    assert [block.self_attn.layer_idx for block in student.model.layers] == [0, 1]
    embeddings = student.encode(["a short text", "another one"])
    student.save(tmp_path / "cut")
    reloaded = TextEncoder(str(tmp_path / "cut"))
    assert reloaded.num_layers == 2 and reloaded.model.config.layer_types == ["full_attention"] * 2
    torch.testing.assert_close(reloaded.encode(["a short text", "another one"]), embeddings)
    for bad in (5, [2, 1], [0, 4], 0):
        with pytest.raises(InputError, match="model.num_layers"):
            TextEncoder(str(bert), num_layers=bad)


# -- through the CLI: one fit in-process, 2 gloo ranks -------------------------------------------------------------
def test_fit_logs_each_part_and_the_card_states_the_teacher(student_dir, teacher_dir, tmp_path):
    import csv

    from codiemb_pl.cli.main import main
    from codiemb_pl.model.encoder import TextEncoder

    ir = write_jsonl(tmp_path / "ir.jsonl", ir_rows(8))
    sts = write_jsonl(tmp_path / "sts.jsonl", [{"text1": f"sentence {i}", "text2": f"phrase {i % 3}",
                                                **({"score": i % 5} if i % 2 else {}), "teacher_score": i / 10}
                                               for i in range(8)])
    train = [{"name": "ir_kd", "task": "ir", "path": str(ir)}, {"name": "sts_kd", "task": "sts", "path": str(sts),
                                                                 "score_range": [0, 5]}]
    distillation = {"ir_weight": 0.5, "sts_weight": 0.5, "embedding_weight": 0.1, "scores_from": "data",
                    "teacher": {"model": str(teacher_dir), "batch_size": 8}}
    root = tmp_path / "run"
    assert main(["fit", "--config", str(Path(__file__).parent / "conf" / "tiny.yaml"),
                 "--model.model_name_or_path", str(student_dir), "--model.num_layers", "1",
                 "--model.distillation", json.dumps(distillation), "--data.train", json.dumps(train),
                 "--data.val", "[]", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "4",
                 "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last",
                 "true", "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.logger", '{"class_path": "codiemb_pl.training.loggers.CSVLogger"}']) == 0
    with open(next(root.rglob("metrics.csv"))) as handle:
        logged = {key for row in csv.DictReader(handle) for key, value in row.items() if value}
    assert {"train/ir/kd", "train/sts/kd", "train/emb/kd", "train/ir/loss", "train/sts/loss"} <= logged
    card = (root / "model" / "README.md").read_text()
    assert "**distillation**: teacher scores = teacher_scores / teacher_score of the training data" in card
    assert f"embedding teacher = {teacher_dir}" in card and "ir_weight = 0.5000, sts_weight = 0.5000" in card
    assert "teacher_temperature = 0.0200" in card and "learned 32 -> 48" in card
    assert "| base model layers kept | `[0]` |" in card
    exported = TextEncoder(str(root / "model"))
    assert exported.num_layers == 1   # the cut student is what is exported, and what its checkpoint rebuilds
    from codiemb_pl.workflows.encoders import load_encoder

    from_checkpoint = load_encoder(root / "checkpoints" / "last.ckpt")
    assert from_checkpoint.num_layers == 1
    torch.testing.assert_close(from_checkpoint.encode(["a text", "two"]), exported.encode(["a text", "two"]))


def test_ir_weight_without_teacher_scores_is_one_clear_error(student_dir, tmp_path):
    from codiemb_pl.cli.fit import run_fit

    rows = [{key: value for key, value in row.items() if key != "teacher_scores"} for row in ir_rows(8)]
    train = [{"name": "plain", "task": "ir", "path": str(write_jsonl(tmp_path / "ir.jsonl", rows))}]
    with pytest.raises(InputError, match="model.distillation.ir_weight: is 0.5 but no IR training source has "
                                         "teacher_scores"):
        run_fit(["--config", str(Path(__file__).parent / "conf" / "tiny.yaml"),
                 "--model.model_name_or_path", str(student_dir), "--model.distillation.ir_weight", "0.5",
                 "--data.train", json.dumps(train), "--data.val", "[]", "--data.cache_dir", str(tmp_path / "cache"),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks", "[]"])


def test_two_ranks_equal_one_process_with_teacher_scores_and_embedding_distillation(student_dir, teacher_dir,
                                                                                      tmp_path):
    """Data teacher scores (KD over each query's own candidates, some padded) and an online teacher's embeddings
    through a learned projection; the 2-rank run also uses the gradient cache."""
    from test_distributed import assert_same_gradients, gradients, ir_records_for_two_ranks, start_gradient_run

    rows = ir_records_for_two_ranks()
    for row in rows:
        row["teacher_scores"] = [score_of(text) for text in row["positives"] + row.get("negatives", [])]
    train = json.dumps([{"name": "ir_kd", "task": "ir", "path": str(write_jsonl(tmp_path / "ir.jsonl", rows))}])
    distillation = json.dumps({"ir_weight": 0.7, "embedding_weight": 0.4, "teacher_temperature": 2.0,
                               "scores_from": "data", "teacher": {"model": str(teacher_dir)}})
    common = ["--data.n_positives", "2", "--data.n_negatives", "2", "--model.distillation", distillation]
    with RunPool() as pool:
        two = start_gradient_run(pool, tmp_path / "w2", student_dir, 2, train,
                                 common + ["--model.grad_cache_chunk_size", "3"])
        one = start_gradient_run(pool, tmp_path / "w1", student_dir, 1, train, common)
        distributed, single = gradients(two), gradients(one)
    assert_same_gradients(distributed, single)
    assert "embedding_projection.weight" in single[0]["grads"]
