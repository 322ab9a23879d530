"""`DistilledObjective`: any training objective plus the teacher's signal carried by its batch (SPEC §10).

The batch may carry (from the data, through the collate, or from the online teacher, `training/teacher_signal.py`):

- IR `teacher_scores` [b, P + N]: the teacher's score of each local query with its own chosen positives, then
  negatives (NaN rows: no scores); adds `ir_weight · L_KD` (`candidate_kl_divergence`), logged `kd`.
- STS `teacher_scores` [b] (NaN: none) and `gold_mask` [b] (False: a pair with a teacher score only): the base
  objective scores against the blended targets (`blended_sts_targets`, β = `sts_weight`); logged `kd` is the
  diagnostic 1 − Pearson(student cosines, teacher scores) over the pairs that have one.
- `teacher_embeddings` {group: [n, d_T]} in the text groups' row order: adds `embedding_weight · L_E` over the
  step's texts, each query's (pair's) own texts averaged, padding slots left out (`text_weights`;
  `embedding_distillation_loss` on `projection(e_S)`), logged `train/emb/kd`.

Everything is computed from the embedding matrices in `score`, so the gradient cache and the cross-device gathers
treat it as any other part of the loss: each query's KL uses only its own candidates, which live on its rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from codiemb_pl.losses.distillation import (DistillationConfig, blended_sts_targets, candidate_kl_divergence,
                                            embedding_distillation_loss, own_candidate_scores, text_weights)
from codiemb_pl.losses.objectives import Embedding, Objective
from codiemb_pl.losses.sts import pearson_loss

EMBEDDING_LOG = "train/emb/kd"   # logged as is (the other keys are relative to train/<task>/)


def final_embedding(embedding: Embedding) -> Tensor:
    return embedding[0] if isinstance(embedding, tuple) else embedding


@dataclass
class DistilledObjective(Objective):
    """`base` (an IR or STS objective) with the distillation terms of `config` (module docstring)."""

    base: Objective
    config: DistillationConfig
    student_temperature: float = 0.02
    projection: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.base.task

    @property
    def wants_middle(self) -> bool:  # type: ignore[override]
        return self.base.wants_middle

    def text_groups(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
        return self.base.text_groups(batch)

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return self.base.batch_size(batch)

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_scores = batch.get("teacher_scores")
        parts: dict[str, Tensor] = {}
        if self.task == "sts" and teacher_scores is not None:
            batch = {**batch, "scores": blended_sts_targets(batch["scores"], teacher_scores, self.config.sts_weight,
                                                            batch.get("gold_mask"))}
            parts["kd"] = self.sts_agreement(embeddings, teacher_scores)
        loss, logs = self.base.score(embeddings, batch)
        if self.task == "ir" and teacher_scores is not None and self.config.ir_weight > 0:
            kd = self.ir_kd(embeddings, batch, teacher_scores)
            loss = loss + self.config.ir_weight * kd
            parts["kd"] = kd.detach()
        teacher_embeddings = batch.get("teacher_embeddings")
        if teacher_embeddings is not None and self.config.embedding_weight > 0:
            emb = self.embedding_kd(embeddings, batch, teacher_embeddings)
            loss = loss + self.config.embedding_weight * emb
            parts[EMBEDDING_LOG] = emb.detach()
        logs = {**logs, **parts, "loss": loss.detach()}
        if "dataset" in batch:
            logs[f"{batch['dataset']}/loss"] = loss.detach()
        return loss, logs

    def ir_kd(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any], teacher_scores: Tensor) -> Tensor:
        queries = final_embedding(embeddings["query"])
        size, dim = queries.shape
        positives = final_embedding(embeddings["positives"]).view(size, -1, dim)
        negatives = final_embedding(embeddings["negatives"]).view(size, -1, dim) if "negatives" in embeddings else None
        student = own_candidate_scores(queries, positives, negatives)
        mask = torch.ones_like(student, dtype=torch.bool)
        if negatives is not None and batch.get("negative_mask") is not None:
            mask[:, positives.shape[1]:] = batch["negative_mask"].to(mask.device)
        if teacher_scores.shape != student.shape:
            raise ValueError(f"teacher_scores {tuple(teacher_scores.shape)} do not match the batch's candidates "
                             f"{tuple(student.shape)} (each query's positives, then its negatives)")
        return candidate_kl_divergence(student, teacher_scores, mask=mask,
                                       student_temperature=self.student_temperature,
                                       teacher_temperature=self.config.teacher_temperature)

    @staticmethod
    @torch.no_grad()
    def sts_agreement(embeddings: Mapping[str, Embedding], teacher_scores: Tensor) -> Tensor:
        predictions = (final_embedding(embeddings["text1"]) * final_embedding(embeddings["text2"])).sum(dim=-1)
        known = torch.isfinite(teacher_scores).to(predictions.device)
        return pearson_loss(predictions[known], teacher_scores.to(predictions.device)[known]).detach()

    def embedding_kd(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any],
                     targets: Mapping[str, Tensor]) -> Tensor:
        """L_E over the step's texts, each query's (pair's) texts weighted 1/(b·|T(q)|), padding slots 0."""
        groups = [group for group in embeddings if group in targets]
        student = torch.cat([final_embedding(embeddings[group]) for group in groups])
        teacher = torch.cat([targets[group] for group in groups])
        sizes = {group: final_embedding(embeddings[group]).shape[0] for group in groups}
        weights = text_weights(self.batch_size(batch), sizes, batch.get("negative_mask") if "negatives" in sizes
                               else None)
        if self.projection is not None:
            student = self.projection(student)
        return embedding_distillation_loss(student, teacher, self.config.embedding_loss,
                                           torch.cat([weights[group] for group in groups]))

    def describe(self) -> dict[str, Any]:
        return self.base.describe()
