"""Training objectives as small objects: embed a batch's text groups, then score the embeddings (SPEC §3–4).

One objective per task (`IRObjective`) or STS variant (`CoDiEmbSTSObjective`, `CoSENTObjective`,
`STSInfoNCEObjective`). Each one splits a training step at the seam the gradient cache needs:

    groups = objective.text_groups(batch)                 {name: tokenised features}, in encoding order
    embeddings = objective.embed(embed_fn, batch)         {name: embed_fn(features, return_middle=...)} (or
                                                          embed_fn.embed_groups(groups, ...): all groups at once)
    loss, logs = objective.score(embeddings, batch)       plain-tensor loss and detached logs
    loss, logs = objective(embed_fn, batch)               both at once

`embed_fn(features, return_middle=bool)` returns `[n, d]` embeddings, or `(final, middle)` when the
objective asks for middle-layer states (`wants_middle`: MidNCE). `logs` are keyed relative to the task
(`loss`, `<dataset>/loss`, component or diagnostic names); `describe()` is what the model card shows.
Objectives hold settings only (no parameters); they are built once (`build_objectives`) and used by the
Lightning module and by the Self Positioning probe alike.

With `widths` (`losses.matryoshka.MatryoshkaWidths`, `model.matryoshka_dims`) every objective scores
Σ_j w_j · L(P_{m_j}(E)) on prefixes of the same embeddings: the cross-device gathers run once at full width (IR:
the candidates; STS: one [b, k] matrix of the k widths' cosine predictions) and the prefixes are taken from what
was gathered; `logs` gain `loss@<m_j>`, the other logs stay those of the largest width (MidNCE, on the middle
layer's full-width embeddings, enters once, with the largest width).
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
from codiemb_pl.losses.matryoshka import MatryoshkaWidths, over_widths
from codiemb_pl.losses.sts import STSLossConfig, cosent_loss, sts_loss

Embedding = Tensor | tuple[Tensor, Tensor]
EmbedFn = Callable[..., Embedding]
STS_OBJECTIVES = ("codiemb", "cosent", "infonce")


def at(widths: Optional[MatryoshkaWidths], embeddings: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
    """P_dim(embeddings) under `widths` (re-normalised prefix); the tensor itself without widths or for None."""
    return embeddings if widths is None or embeddings is None else widths.prefix(embeddings, dim)


def widths_of(widths: Optional[MatryoshkaWidths]) -> tuple[Optional[int], ...]:
    """The widths an objective scores, largest first: (None,) = the full embeddings only."""
    return widths.dims if widths is not None else (None,)


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
        """{group: embedding}; an `embed_fn` with `embed_groups` (`model.step_embedding.StepEmbedder`) gets every
        group at once (one forward per step where shapes allow)."""
        groups = self.text_groups(batch)
        embed_groups = getattr(embed_fn, "embed_groups", None)
        if embed_groups is not None:
            return embed_groups(groups, return_middle=self.wants_middle)
        return {name: embed_fn(features, return_middle=self.wants_middle) for name, features in groups.items()}

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
    widths: Optional[MatryoshkaWidths] = None
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

        def loss_at(dim: Optional[int]) -> Tensor:
            return multi_positive_info_nce(
                at(self.widths, queries, dim), at(self.widths, positives, dim), at(self.widths, negatives, dim),
                temperature=self.temperature, query_offset=offset, negative_mask=negative_mask,
                query_positive_ids=query_positive_ids if use_ids else None,
                positive_ids=positive_ids if use_ids else None, negative_ids=negative_ids if use_ids else None)

        loss, width_logs = over_widths(loss_at, self.widths)
        logs = {"loss": loss.detach()}
        if "dataset" in batch:
            logs[f"{batch['dataset']}/loss"] = loss.detach()
        logs.update(width_logs)
        logs.update(ir_batch_diagnostics(queries.detach(), positives.detach(),
                                         None if negatives is None else negatives.detach(), negative_mask, offset))
        return loss, logs

    def describe(self) -> dict[str, Any]:
        return {"loss": "multi-positive InfoNCE with hard negatives", "temperature": self.temperature,
                "cross_device_negatives": self.cross_device_negatives, "false_negative_mask": self.false_negative_mask,
                **describe_widths(self.widths)}


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

    @staticmethod
    def width_predictions(emb1: Tensor, emb2: Tensor, widths: Optional[MatryoshkaWidths], gather: bool
                          ) -> dict[Optional[int], Tensor]:
        """{width: cosine predictions p_i = P(e1_i)·P(e2_i)} of every scored width, over the gathered global batch
        when `gather` (one gather of the [b, k] matrix of all widths)."""
        dims = widths_of(widths)
        predictions = torch.stack([(at(widths, emb1, d) * at(widths, emb2, d)).sum(dim=-1) for d in dims], dim=1)
        if gather:
            predictions = gather_with_grad(predictions)
        return dict(zip(dims, predictions.unbind(dim=1)))


@dataclass
class CoDiEmbSTSObjective(_PairObjective):
    """CoDiEmb's STS loss Σ_c w_c·L_c (2·Pearson + 5·rank-KL + 0.5·PRO + 1·MidNCE by default, `sts_loss`) on
    the cosine predictions p_i = e1_i·e2_i; over the gathered global batch when `gather` (DDP)."""

    config: STSLossConfig = field(default_factory=STSLossConfig)
    gather: bool = False
    widths: Optional[MatryoshkaWidths] = None

    @property
    def wants_middle(self) -> bool:  # type: ignore[override]
        return self.config.mid_nce > 0

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        (emb1, mid1), (emb2, mid2) = self.split(embeddings["text1"]), self.split(embeddings["text2"])
        gather, scores = self.gather and rank_and_world()[1] > 1, batch["scores"]
        predictions = self.width_predictions(emb1, emb2, self.widths, gather)
        if gather:
            scores = gather_no_grad(scores)
            if mid1 is not None:
                mid1, mid2 = gather_with_grad(mid1), gather_with_grad(mid2)
        largest = widths_of(self.widths)[0]
        components: dict[str, Tensor] = {}

        def loss_at(dim: Optional[int]) -> Tensor:
            first = dim == largest
            value, parts = sts_loss(predictions[dim], scores, self.config, mid1=mid1 if first else None,
                                    mid2=mid2 if first else None)
            if first:
                components.update(parts)
            return value

        loss, width_logs = over_widths(loss_at, self.widths)
        return loss, self.with_dataset(loss, batch, {**components, **width_logs})

    def describe(self) -> dict[str, Any]:
        weights = asdict(self.config)
        return {"objective": "codiemb", **{name: weights[name] for name in ("pearson", "rank_kl", "pro", "mid_nce",
                                                                              "cosent") if weights[name]},
                **describe_widths(self.widths)}


@dataclass
class CoSENTObjective(_PairObjective):
    """CoSENT on the cosine predictions: log(1 + Σ_{y_a < y_b} exp(scale·(p_a − p_b))) (`cosent_loss`)."""

    scale: float = 20.0
    gather: bool = False
    widths: Optional[MatryoshkaWidths] = None

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        gather, scores = self.gather and rank_and_world()[1] > 1, batch["scores"]
        predictions = self.width_predictions(embeddings["text1"], embeddings["text2"], self.widths, gather)
        if gather:
            scores = gather_no_grad(scores)
        loss, width_logs = over_widths(lambda dim: cosent_loss(predictions[dim], scores, self.scale), self.widths)
        return loss, self.with_dataset(loss, batch, {"cosent": loss.detach(), **width_logs})

    def describe(self) -> dict[str, Any]:
        return {"objective": "cosent", "scale": self.scale, **describe_widths(self.widths)}


@dataclass
class STSInfoNCEObjective(_PairObjective):
    """The one-loss baseline: in-batch InfoNCE text1_i → text2_j over the pairs scored ≥ `threshold`
    (`multi_positive_info_nce` with one positive and no hard negatives); a zero loss when none is."""

    temperature: float = 0.02
    threshold: float = 0.8
    widths: Optional[MatryoshkaWidths] = None

    def score(self, embeddings: Mapping[str, Embedding], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        emb1, emb2 = embeddings["text1"], embeddings["text2"]
        keep = batch["scores"] >= self.threshold

        def loss_at(dim: Optional[int]) -> Tensor:
            if not keep.any():
                return (emb1.sum() + emb2.sum()) * 0.0
            positives = at(self.widths, emb2[keep], dim).unsqueeze(1)
            return multi_positive_info_nce(at(self.widths, emb1[keep], dim), positives, None,
                                           temperature=self.temperature)

        loss, width_logs = over_widths(loss_at, self.widths)
        return loss, {"loss": loss.detach(), **width_logs}

    def describe(self) -> dict[str, Any]:
        return {"objective": "infonce", "threshold": self.threshold, "temperature": self.temperature,
                **describe_widths(self.widths)}


def build_sts_objective(objective: str, config: Optional[STSLossConfig] = None, *, gather: bool = False,
                        infonce_temperature: float = 0.02, infonce_threshold: float = 0.8,
                        widths: Optional[MatryoshkaWidths] = None) -> Objective:
    """The STS objective named `objective` (codiemb, cosent or infonce) from the module's settings."""
    config = config or STSLossConfig()
    if objective == "codiemb":
        return CoDiEmbSTSObjective(config, gather=gather, widths=widths)
    if objective == "cosent":
        return CoSENTObjective(config.cosent_scale, gather=gather, widths=widths)
    if objective == "infonce":
        return STSInfoNCEObjective(infonce_temperature, infonce_threshold, widths=widths)
    raise InputError("model.sts_objective", f"unknown STS objective {objective!r}",
                     f"use one of: {', '.join(STS_OBJECTIVES)}")


def describe_widths(widths: Optional[MatryoshkaWidths]) -> dict[str, Any]:
    """The Matryoshka part of an objective's card entry (nothing without widths)."""
    if widths is None:
        return {}
    return {"matryoshka_dims": list(widths.dims), "matryoshka_weights": list(widths.weights)}


def text_group_sizes(task: str, batch_size: int, n_positives: int = 1, n_negatives: int = 0) -> list[int]:
    """Texts per group of one micro-batch: IR [queries, b·P positives, b·N negatives], STS [b, b]."""
    if task == "ir":
        return [batch_size, batch_size * n_positives] + ([batch_size * n_negatives] if n_negatives else [])
    return [batch_size, batch_size]


def describe_objectives(objectives: Mapping[str, Objective]) -> dict[str, dict[str, Any]]:
    """{"IR": settings, "STS": settings}: the losses section of the model card."""
    return {task.upper(): objective.describe() for task, objective in objectives.items()}
