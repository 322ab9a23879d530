"""The training objectives (`losses/objectives.py`): embed-then-score equals the plain loss functions, the
STS variants keep their former definitions, the module and the probe build them from their settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codiemb_pl.errors import InputError
from codiemb_pl.losses.ir import multi_positive_info_nce
from codiemb_pl.losses.objectives import (
    CoDiEmbSTSObjective,
    CoSENTObjective,
    IRObjective,
    STSInfoNCEObjective,
    build_sts_objective,
    describe_objectives,
)
from codiemb_pl.losses.sts import STSLossConfig, sts_loss


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def features(rows: int, start: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in tokenised features: the fake embedder below reads the row ids from `input_ids`."""
    return {"input_ids": torch.arange(start, start + rows)[:, None], "attention_mask": torch.ones(rows, 1, dtype=torch.long)}


def table_embedder(table: torch.Tensor, middle: torch.Tensor | None = None):
    def embed(batch_features, return_middle=False):
        rows = batch_features["input_ids"][:, 0]
        return (table[rows], middle[rows]) if return_middle else table[rows]
    return embed


def ir_batch(size: int = 3, positives: int = 2, negatives: int = 2) -> dict:
    mask = torch.ones(size, negatives, dtype=torch.bool)
    mask[0, -1] = False
    return {"task": "ir", "dataset": "d", "query": features(size), "positives": features(size * positives, size),
            "negatives": features(size * negatives, size * (1 + positives)), "negative_mask": mask}


def test_ir_objective_is_multi_positive_info_nce_of_the_embedded_groups():
    batch, table = ir_batch(), unit(15, 8, seed=0)
    objective = IRObjective(temperature=0.05)
    assert list(objective.text_groups(batch)) == ["query", "positives", "negatives"]
    loss, logs = objective(table_embedder(table), batch)
    expected = multi_positive_info_nce(table[:3], table[3:9].view(3, 2, 8), table[9:15].view(3, 2, 8),
                                       temperature=0.05, negative_mask=batch["negative_mask"])
    torch.testing.assert_close(loss, expected)
    assert logs["loss"] == loss and logs["d/loss"] == loss
    assert {"accuracy", "mean_rank_of_positive", "margin"} <= set(logs)
    assert objective.batch_size(batch) == 3


def test_ir_objective_without_negatives_scores_in_batch_only():
    batch = ir_batch()
    batch["negatives"] = batch["negative_mask"] = None
    table = unit(9, 4, seed=1)
    objective = IRObjective(temperature=0.1)
    assert list(objective.text_groups(batch)) == ["query", "positives"]
    loss, _ = objective(table_embedder(table), batch)
    torch.testing.assert_close(loss, multi_positive_info_nce(table[:3], table[3:9].view(3, 2, 4), None,
                                                             temperature=0.1))


def sts_batch(scores: list[float]) -> dict:
    n = len(scores)
    return {"task": "sts", "dataset": "s", "text1": features(n), "text2": features(n, n),
            "scores": torch.tensor(scores, dtype=torch.float64)}


def test_codiemb_sts_objective_with_midnce_asks_for_middle_states():
    batch = sts_batch([0.9, 0.1, 0.85, 0.4])
    first, middle = unit(8, 8, seed=2), unit(8, 8, seed=3)
    objective = CoDiEmbSTSObjective(STSLossConfig())
    assert objective.wants_middle and not CoDiEmbSTSObjective(STSLossConfig(mid_nce=0.0)).wants_middle
    loss, logs = objective(table_embedder(first, middle), batch)
    expected, components = sts_loss((first[:4] * first[4:]).sum(-1), batch["scores"], STSLossConfig(),
                                    mid1=middle[:4], mid2=middle[4:])
    torch.testing.assert_close(loss, expected)
    assert logs["s/loss"] == loss and set(components) <= set(logs) and "mid_nce" in logs


def test_cosent_objective_equals_the_former_zeroed_weights_config():
    batch = sts_batch([0.9, 0.1, 0.5, 0.3])
    left, right = unit(4, 8, seed=4), unit(4, 8, seed=5)
    embeddings = {"text1": left, "text2": right}
    loss, logs = CoSENTObjective(scale=20.0).score(embeddings, batch)
    former = STSLossConfig(pearson=0.0, rank_kl=0.0, pro=0.0, mid_nce=0.0, cosent=1.0, cosent_scale=20.0)
    expected, components = sts_loss((left * right).sum(-1), batch["scores"], former)
    assert torch.equal(loss, expected) and torch.equal(logs["cosent"], components["cosent"])


def test_sts_infonce_uses_the_high_score_pairs_and_the_ir_temperature_by_default():
    batch = sts_batch([0.9, 0.2, 0.95, 0.8])
    left, right = unit(4, 8, seed=6), unit(4, 8, seed=7)
    objective = build_sts_objective("infonce", infonce_temperature=0.05, infonce_threshold=0.8)
    loss, logs = objective.score({"text1": left, "text2": right}, batch)
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss, multi_positive_info_nce(left[keep], right[keep].unsqueeze(1), None,
                                                             temperature=0.05))
    none_kept, _ = objective.score({"text1": left, "text2": right}, sts_batch([0.1, 0.2, 0.3, 0.4]))
    assert none_kept.item() == 0.0 and none_kept.requires_grad is False  # no grad needed for plain tensors


def test_module_builds_its_objectives_from_the_hyperparameters(tiny_model_dir):
    from codiemb_pl.training.module import CoDiEmbModule

    module = CoDiEmbModule(str(tiny_model_dir), ir_temperature=0.07, sts_objective="infonce",
                           sts_infonce_threshold=0.6)
    assert module.objectives["ir"] == IRObjective(0.07, True, False)
    assert module.objectives["sts"] == STSInfoNCEObjective(temperature=0.07, threshold=0.6)  # τ defaults to IR's
    own = CoDiEmbModule(str(tiny_model_dir), sts_objective="infonce", sts_infonce_temperature=0.03)
    assert own.objectives["sts"].temperature == 0.03
    card = CoDiEmbModule(str(tiny_model_dir), sts_objective="cosent").objectives_for_card()
    assert card["IR"]["loss"] == "multi-positive InfoNCE with hard negatives" and card["STS"]["objective"] == "cosent"


def test_objectives_describe_themselves_for_the_card():
    described = describe_objectives({"ir": IRObjective(0.02), "sts": CoDiEmbSTSObjective(STSLossConfig(pro=0.0))})
    assert described["IR"] == {"loss": "multi-positive InfoNCE with hard negatives", "temperature": 0.02,
                               "cross_device_negatives": True, "false_negative_mask": False}
    assert described["STS"] == {"objective": "codiemb", "pearson": 2.0, "rank_kl": 5.0, "mid_nce": 1.0}


def test_unknown_sts_objective_is_one_clear_error():
    with pytest.raises(InputError, match="unknown STS objective 'pairwise'"):
        build_sts_objective("pairwise")
