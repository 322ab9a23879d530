"""Training objectives as small objects: embed a batch's text groups, then score the embeddings (SPEC §3–4).

One objective per task (`IRObjective`) or STS variant (`CoDiEmbSTSObjective`, `CoSENTObjective`,
`STSInfoNCEObjective`). Each one splits a training step at the seam the gradient cache needs:

    groups = objective.text_groups(batch)                 {name: tokenised features}, in encoding order
    embeddings = objective.embed(embed_fn, batch)         {name: embed_fn(features, return_middle=...)}
    loss, logs = objective.score(embeddings, batch)       plain-tensor loss and detached logs
    loss, logs = objective(embed_fn, batch)               both at once

`embed_fn(features, return_middle=bool)` returns `[n, d]` embeddings, or `(final, middle)` when the
objective asks for middle-layer states (`wants_middle`: MidNCE). `logs` are keyed relative to the task
(`loss`, `<dataset>/loss`, component or diagnostic names); `describe()` is what the model card shows.
Objectives hold settings only (no parameters); they are built once (`build_objectives`) and used by the
Lightning module and by the Self Positioning probe alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.losses.gather import gather_no_grad, gather_with_grad, rank_and_world
from codiemb_pl.losses.ir import ir_batch_diagnostics, multi_positive_info_nce
from codiemb_pl.losses.sts import STSLossConfig, cosent_loss, sts_loss

Embedding = Tensor | tuple[Tensor, Tensor]
EmbedFn = Callable[..., Embedding]
STS_OBJECTIVES = ("codiemb", "cosent", "infonce")


def pad_negatives_to_every_ranks_count(
    positives: Tensor, negatives: Optional[Tensor], negative_mask: Optional[Tensor], negative_ids: Optional[Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Give this rank's micro-batch as many hard-negative slots as the other ranks' (DDP only).

    The collate leaves negatives out of a micro-batch none of whose queries has any; if another rank's
    micro-batch has N, this rank would skip the gathers the others run (a hang or a crash). It gets N
    masked placeholder slots instead, kept in the autograd graph so the gather's backward runs here too.
    """
    count = torch.tensor([0 if negatives is None else negatives.shape[1]], device=positives.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    slots = int(count.item())
    if negatives is not None or slots == 0:
        return negatives, negative_mask, negative_ids
    size, dim = positives.shape[0], positives.shape[-1]
    placeholders = (positives[:, :1] * 0.0).expand(size, slots, dim)
    masked = torch.zeros(size, slots, dtype=torch.bool, device=positives.device)
    ids = torch.zeros(size, slots, dtype=torch.long, device=positives.device)
    return placeholders, masked, ids


class Objective:
    """Embed-then-score contract shared by the IR and STS objectives (see the module docstring)."""

    task: str = ""
    wants_middle: bool = False

    def text_groups(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
        raise NotImplementedError

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def embed(self, embed_fn: EmbedFn, batch: Mapping[str, Any]) -> dict[str, Embedding]:
        return {name: embed_fn(features, return_middle=self.wants_middle)
                for name, features in self.text_groups(batch).items()}

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, embed_fn: EmbedFn, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.score(self.embed(embed_fn, batch), batch)


@dataclass
class IRObjective(Objective):
    """Multi-positive InfoNCE of the local queries against the positives and hard negatives of the global
    batch (`multi_positive_info_nce`, SPEC §3); candidates gathered from every rank with gradient when
    `cross_device_negatives` and torch.distributed runs more than one rank."""

    temperature: float = 0.02
    cross_device_negatives: bool = True
    false_negative_mask: bool = False
    task = "ir"

    def text_groups(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
        groups = {"query": batch["query"], "positives": batch["positives"]}
        if batch.get("negatives") is not None:
            groups["negatives"] = batch["negatives"]
        return groups

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return int(batch["query"]["input_ids"].shape[0])

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        queries = embeddings["query"]
        size, dim = queries.shape
        positives = embeddings["positives"].view(size, -1, dim)
        negatives = embeddings["negatives"].view(size, -1, dim) if "negatives" in embeddings else None
        negative_mask = batch.get("negative_mask")
        positive_ids, negative_ids = batch.get("positive_ids"), batch.get("negative_ids")
        query_positive_ids = positive_ids
        offset = 0
        rank, world = rank_and_world()
        if self.cross_device_negatives and world > 1:
            offset = rank * size
            negatives, negative_mask, negative_ids = pad_negatives_to_every_ranks_count(
                positives, negatives, negative_mask, negative_ids)
            positives = gather_with_grad(positives)
            if negatives is not None:
                negatives = gather_with_grad(negatives)
                negative_mask = gather_no_grad(negative_mask)
                negative_ids = gather_no_grad(negative_ids)
            positive_ids = gather_no_grad(positive_ids)
        use_ids = self.false_negative_mask
        loss = multi_positive_info_nce(
            queries, positives, negatives, temperature=self.temperature, query_offset=offset,
            negative_mask=negative_mask, query_positive_ids=query_positive_ids if use_ids else None,
            positive_ids=positive_ids if use_ids else None, negative_ids=negative_ids if use_ids else None)
        logs = {"loss": loss.detach()}
        if "dataset" in batch:
            logs[f"{batch['dataset']}/loss"] = loss.detach()
        logs.update(ir_batch_diagnostics(queries.detach(), positives.detach(),
                                         None if negatives is None else negatives.detach(), negative_mask, offset))
        return loss, logs

    def describe(self) -> dict[str, Any]:
        return {"loss": "multi-positive InfoNCE with hard negatives", "temperature": self.temperature,
                "cross_device_negatives": self.cross_device_negatives, "false_negative_mask": self.false_negative_mask}


class _PairObjective(Objective):
    """STS objectives score pairs (text1_i, text2_i) against gold scores `batch["scores"]`."""

    task = "sts"

    def text_groups(self, batch: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
        return {"text1": batch["text1"], "text2": batch["text2"]}

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return int(batch["scores"].shape[0])

    @staticmethod
    def split(embedding: Embedding) -> tuple[Tensor, Optional[Tensor]]:
        return embedding if isinstance(embedding, tuple) else (embedding, None)

    @staticmethod
    def with_dataset(loss: Tensor, batch: Mapping[str, Any], logs: dict[str, Tensor]) -> dict[str, Tensor]:
        head = {"loss": loss.detach()}
        if "dataset" in batch:
            head[f"{batch['dataset']}/loss"] = loss.detach()
        return {**head, **logs}


@dataclass
class CoDiEmbSTSObjective(_PairObjective):
    """CoDiEmb's STS loss Σ_c w_c·L_c (2·Pearson + 5·rank-KL + 0.5·PRO + 1·MidNCE by default, `sts_loss`) on
    the cosine predictions p_i = e1_i·e2_i; over the gathered global batch when `gather` (DDP)."""

    config: STSLossConfig = field(default_factory=STSLossConfig)
    gather: bool = False

    @property
    def wants_middle(self) -> bool:  # type: ignore[override]
        return self.config.mid_nce > 0

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        (emb1, mid1), (emb2, mid2) = self.split(embeddings["text1"]), self.split(embeddings["text2"])
        predictions, scores = (emb1 * emb2).sum(dim=-1), batch["scores"]
        if self.gather and rank_and_world()[1] > 1:
            predictions, scores = gather_with_grad(predictions), gather_no_grad(scores)
            if mid1 is not None:
                mid1, mid2 = gather_with_grad(mid1), gather_with_grad(mid2)
        loss, components = sts_loss(predictions, scores, self.config, mid1=mid1, mid2=mid2)
        return loss, self.with_dataset(loss, batch, components)

    def describe(self) -> dict[str, Any]:
        weights = asdict(self.config)
        return {"objective": "codiemb", **{name: weights[name] for name in ("pearson", "rank_kl", "pro", "mid_nce",
                                                                              "cosent") if weights[name]}}


@dataclass
class CoSENTObjective(_PairObjective):
    """CoSENT on the cosine predictions: log(1 + Σ_{y_a < y_b} exp(scale·(p_a − p_b))) (`cosent_loss`)."""

    scale: float = 20.0
    gather: bool = False

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        predictions, scores = (embeddings["text1"] * embeddings["text2"]).sum(dim=-1), batch["scores"]
        if self.gather and rank_and_world()[1] > 1:
            predictions, scores = gather_with_grad(predictions), gather_no_grad(scores)
        loss = cosent_loss(predictions, scores, self.scale)
        return loss, self.with_dataset(loss, batch, {"cosent": loss.detach()})

    def describe(self) -> dict[str, Any]:
        return {"objective": "cosent", "scale": self.scale}


@dataclass
class STSInfoNCEObjective(_PairObjective):
    """The one-loss baseline: in-batch InfoNCE text1_i → text2_j over the pairs scored ≥ `threshold`
    (`multi_positive_info_nce` with one positive and no hard negatives); a zero loss when none is."""

    temperature: float = 0.02
    threshold: float = 0.8

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        emb1, emb2 = embeddings["text1"], embeddings["text2"]
        keep = batch["scores"] >= self.threshold
        if keep.any():
            loss = multi_positive_info_nce(emb1[keep], emb2[keep].unsqueeze(1), None, temperature=self.temperature)
        else:
            loss = (emb1.sum() + emb2.sum()) * 0.0
        return loss, {"loss": loss.detach()}

    def describe(self) -> dict[str, Any]:
        return {"objective": "infonce", "threshold": self.threshold, "temperature": self.temperature}


def build_sts_objective(objective: str, config: Optional[STSLossConfig] = None, *, gather: bool = False,
                        infonce_temperature: float = 0.02, infonce_threshold: float = 0.8) -> Objective:
    """The STS objective named `objective` (codiemb, cosent or infonce) from the module's settings."""
    config = config or STSLossConfig()
    if objective == "codiemb":
        return CoDiEmbSTSObjective(config, gather=gather)
    if objective == "cosent":
        return CoSENTObjective(config.cosent_scale, gather=gather)
    if objective == "infonce":
        return STSInfoNCEObjective(infonce_temperature, infonce_threshold)
    raise InputError("model.sts_objective", f"unknown STS objective {objective!r}",
                     f"use one of: {', '.join(STS_OBJECTIVES)}")


def text_group_sizes(task: str, batch_size: int, n_positives: int = 1, n_negatives: int = 0) -> list[int]:
    """Texts per group of one micro-batch: IR [queries, b·P positives, b·N negatives], STS [b, b]."""
    if task == "ir":
        return [batch_size, batch_size * n_positives] + ([batch_size * n_negatives] if n_negatives else [])
    return [batch_size, batch_size]


def describe_objectives(objectives: Mapping[str, Objective]) -> dict[str, dict[str, Any]]:
    """{"IR": settings, "STS": settings}: the losses section of the model card."""
    return {task.upper(): objective.describe() for task, objective in objectives.items()}
