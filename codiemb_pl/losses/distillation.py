"""Learning from a teacher (SPEC §10): plain-tensor losses and the `model.distillation` settings.

IR score distillation, per query q over its own candidates C(q) (the positives and hard negatives the step
chose for it, padding slots left out):

    p_T(d|q) = softmax_{d∈C(q)}(t(q,d)/τ_T),   p_S(d|q) = softmax_{d∈C(q)}(s(q,d)/τ_S)
    L_KD = 1/b Σ_q KL(p_T ‖ p_S) = 1/b Σ_q Σ_d p_T (log p_T − log p_S)

with s the student's score (the dot product of its embeddings, the InfoNCE's similarity: cosine when normalised)
and t the teacher's (a cosine or a cross-encoder logit, taken as given). A query without teacher scores (NaN)
adds 0; dividing by the b local queries keeps DDP's average the global mean (each rank has b queries).

STS distillation: target y = (1−β)·y_gold + β·y_T where both exist, y_T where there is no gold score, y_gold
where there is no teacher score; the order-aware STS terms use y unchanged.

Embedding distillation, ℓ(x) = ‖W e_S(x) − e_T(x)‖² (`mse`) or 1 − cos(W e_S(x), e_T(x)) (`cosine`), W a learned
projection when the widths differ (the caller applies it), identity otherwise:

    L_E = 1/b Σ_q 1/|T(q)| Σ_{x∈T(q)} ℓ(x)

T(q) the texts of query q's share of the step (itself, its positives, its real negatives; an STS pair's two
sentences). With every query holding the same number of texts this is the plain mean over the step's texts; the
per-query mean keeps it exact under DDP when queries differ (padding slots excluded, a rank without negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.model.teacher import TeacherSettings

EMBEDDING_LOSSES = ("mse", "cosine")
SCORE_SOURCES = ("auto", "teacher", "data")


def own_candidate_scores(queries: Tensor, positives: Tensor, negatives: Optional[Tensor]) -> Tensor:
    """s(q_i, d) [b, P + N] of each local query with its own P positives [b, P, d] and N negatives [b, N, d]."""
    candidates = positives if negatives is None else torch.cat([positives, negatives], dim=1)
    return torch.einsum("bd,bcd->bc", queries, candidates)


def candidate_kl_divergence(student_scores: Tensor, teacher_scores: Tensor, *, student_temperature: float,
                            teacher_temperature: float, mask: Optional[Tensor] = None) -> Tensor:
    """L_KD = 1/b Σ_i KL(p_T,i ‖ p_S,i) over the candidates where `mask` [b, C] is True (module docstring).

    `student_scores`, `teacher_scores`: [b, C]; a row whose teacher scores (under the mask) are not all finite
    adds 0. Returns a scalar connected to `student_scores`.
    """
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {student_temperature} and {teacher_temperature}")
    if mask is None:
        mask = torch.ones_like(student_scores, dtype=torch.bool)
    mask = mask.to(student_scores.device)
    teacher = teacher_scores.to(device=student_scores.device, dtype=student_scores.dtype)
    has_teacher = (torch.isfinite(teacher) | ~mask).all(dim=1)
    teacher = torch.where(torch.isfinite(teacher), teacher, torch.zeros_like(teacher))
    log_student = F.log_softmax((student_scores / student_temperature).masked_fill(~mask, float("-inf")), dim=1)
    log_teacher = F.log_softmax((teacher / teacher_temperature).masked_fill(~mask, float("-inf")), dim=1)
    log_student, log_teacher = log_student.masked_fill(~mask, 0.0), log_teacher.masked_fill(~mask, 0.0)
    per_query = (log_teacher.exp().masked_fill(~mask, 0.0) * (log_teacher - log_student)).sum(dim=1)
    return torch.where(has_teacher, per_query, torch.zeros_like(per_query)).sum() / student_scores.shape[0]


def blended_sts_targets(gold: Tensor, teacher: Tensor, weight: float, gold_mask: Optional[Tensor] = None) -> Tensor:
    """y_i = (1−β)·gold_i + β·teacher_i where both exist, teacher_i without gold (`gold_mask` False), gold_i
    where the teacher score is NaN. `weight` = β in [0, 1]."""
    teacher = teacher.to(device=gold.device, dtype=gold.dtype)
    has_gold = torch.ones_like(gold, dtype=torch.bool) if gold_mask is None else gold_mask.to(gold.device)
    has_teacher = torch.isfinite(teacher)
    blended = torch.where(has_gold, (1.0 - weight) * gold + weight * teacher, teacher)
    return torch.where(has_teacher, blended, gold)


def embedding_distillation_loss(student: Tensor, teacher: Tensor, kind: str = "mse",
                                weights: Optional[Tensor] = None) -> Tensor:
    """Σ_i w_i·ℓ_i with ℓ_i = ‖student_i − teacher_i‖² (`mse`) or 1 − cos(student_i, teacher_i) (`cosine`); `student`
    already projected to the teacher's width; `weights` [n] default 1/n (`text_weights` gives L_E's)."""
    teacher = teacher.to(device=student.device, dtype=student.dtype)
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ")
    if kind == "mse":
        per_text = (student - teacher).pow(2).sum(dim=-1)
    elif kind == "cosine":
        per_text = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        raise ValueError(f"unknown embedding loss {kind!r}; use one of {EMBEDDING_LOSSES}")
    if weights is None:
        return per_text.mean()
    return (per_text * weights.to(device=per_text.device, dtype=per_text.dtype)).sum()


def text_weights(queries: int, group_sizes: dict[str, int], negative_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per-text weights of L_E, {group: [rows]} in query-major row order: 1/(b·|T(q)|) for each text of query q
    (IR groups `query`, `positives`, `negatives` with `negative_mask` [b, N] False for padding slots: weight 0;
    STS groups `text1`, `text2`, one row per pair)."""
    per_query = {name: size // queries for name, size in group_sizes.items()}
    real = {name: torch.ones(queries, width) for name, width in per_query.items()}
    if negative_mask is not None and "negatives" in real:
        real["negatives"] = negative_mask.to(torch.float32).cpu()
    counts = sum(rows.sum(dim=1) for rows in real.values())
    return {name: (rows / (queries * counts)[:, None]).reshape(-1) for name, rows in real.items()}


@dataclass
class DistillationConfig:
    """Learning from a teacher: IR score distillation, STS target blending, embedding distillation (SPEC §10).

    Attributes:
        ir_weight: λ_KD: the IR loss is InfoNCE + λ_KD · KL(p_teacher ‖ p_student) over each query's own
            candidates (0: off).
        sts_weight: β: the STS terms score against (1 − β)·gold + β·teacher (pairs without a gold score use the
            teacher's).
        embedding_weight: λ_E: + λ_E · L_E, the distance of the student's (projected) embeddings to the online
            bi-encoder teacher's, in every step (0: off).
        embedding_loss: mse (squared L2 distance) or cosine (1 − cosine similarity).
        teacher_temperature: τ_T of the teacher's score softmax (bi-encoder cosines: about 0.02-0.05;
            cross-encoder logits: about 1).
        student_temperature: τ_S of the student's score softmax (None: model.ir_temperature).
        teacher: a teacher model run without gradients on every step's texts (online); None: the teacher_scores
            / teacher_score fields of the training data.
        scores_from: auto (the online teacher when one is set, else the data), teacher, or data (the data's
            scores for KD, the teacher for the embedding term only).
    """

    ir_weight: float = 0.0
    sts_weight: float = 0.0
    embedding_weight: float = 0.0
    embedding_loss: Literal["mse", "cosine"] = "mse"
    teacher_temperature: float = 0.02
    student_temperature: Optional[float] = None
    teacher: Optional[TeacherSettings] = None
    scores_from: Literal["auto", "teacher", "data"] = "auto"

    def __post_init__(self) -> None:
        where = "model.distillation"
        if isinstance(self.teacher, dict):
            self.teacher = TeacherSettings(**self.teacher)
        for name in ("ir_weight", "sts_weight", "embedding_weight"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{where}.{name}", f"weight {getattr(self, name)} is negative",
                                 "use a weight >= 0 (0 turns that part off)")
        if self.sts_weight > 1:
            raise InputError(f"{where}.sts_weight", f"{self.sts_weight} > 1", "β blends gold and teacher: use 0 to 1")
        for name in ("teacher_temperature", "student_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"{where}.{name}", f"{value} is not positive", "use a temperature > 0")
        if self.embedding_loss not in EMBEDDING_LOSSES:
            raise InputError(f"{where}.embedding_loss", f"unknown {self.embedding_loss!r}",
                             f"use one of {', '.join(EMBEDDING_LOSSES)}")
        if self.scores_from not in SCORE_SOURCES:
            raise InputError(f"{where}.scores_from", f"unknown {self.scores_from!r}",
                             f"use one of {', '.join(SCORE_SOURCES)}")
        if self.scores_from == "teacher" and self.teacher is None:
            raise InputError(f"{where}.scores_from", "is `teacher` but no teacher is set",
                             "set model.distillation.teacher.model, or use scores_from: data")
        if self.embedding_weight > 0 and self.teacher is None:
            raise InputError(f"{where}.embedding_weight", "embedding distillation needs an online teacher",
                             "set model.distillation.teacher.model to a bi-encoder")

    @property
    def online_scores(self) -> bool:
        """Whether teacher scores come from the online teacher (else from the data)."""
        return self.teacher is not None and self.scores_from != "data"

    def describe(self, projection: Optional[str] = None, teacher_kind: Optional[str] = None) -> dict:
        """The model card's distillation line: teacher (and its resolved kind), weights, temperatures."""
        source = (f"{self.teacher.model} ({teacher_kind or self.teacher.kind}, online)" if self.online_scores
                  else "teacher_scores / teacher_score of the training data")
        settings = {"teacher scores": source, "ir_weight": self.ir_weight, "sts_weight": self.sts_weight,
                    "teacher_temperature": self.teacher_temperature,
                    "student_temperature": self.student_temperature}
        if self.embedding_weight:
            settings.update({"embedding_weight": self.embedding_weight, "embedding_loss": self.embedding_loss,
                             "embedding teacher": self.teacher.model,
                             "projection": projection or "identity"})
        return settings
