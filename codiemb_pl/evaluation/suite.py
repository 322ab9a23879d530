"""Score an encoder on evaluation sets (`data.eval_sets.EvalSet`): the one place where embeddings become the reported metrics.

Used by the LightningModule (embeddings gathered during `validate`), by fusion (each merged candidate)
and by `codiemb evaluate` (`workflows.evaluation`). Headline metrics follow MTEB: `cosine_spearman` (STS),
`ndcg_at_10` (IR); `ir_avg` / `sts_avg` average the headline over sets of a task and `avg` averages the two.
Scores at a smaller width or a compact precision (`evaluation.variants`) carry a suffix (`ndcg_at_10@64`,
`cosine_spearman@128:int8`) and get their own averages (`avg@64`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.evaluation.retrieval import RETRIEVAL_METRIC_NAMES, retrieval_metrics
from codiemb_pl.evaluation.sts import STS_METRIC_NAMES, sts_metrics
from codiemb_pl.model.widths import metric_key

HEADLINE = {"ir": "ndcg_at_10", "sts": "cosine_spearman"}
SET_METRIC_NAMES = {"ir": RETRIEVAL_METRIC_NAMES, "sts": STS_METRIC_NAMES}


def score_set(vset: EvalSet, embeddings: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of one set from its per-field embeddings (`text1`/`text2` or `query`/`corpus`)."""
    if vset.task == "sts":
        gold = torch.tensor(vset.gold, dtype=torch.float32)
        return sts_metrics(embeddings["text1"].cpu(), embeddings["text2"].cpu(), gold)
    return retrieval_metrics(embeddings["query"], embeddings["corpus"], vset.query_ids, vset.doc_ids, vset.qrels)


def headline_suffixes(per_set: Mapping[str, Mapping[str, float]], tasks: Mapping[str, str]) -> list[str]:
    """The variant suffixes (`@64`, `@128:int8`, ...) that every set carries its headline metric with."""
    seen: dict[str, set[str]] = {}
    for name, task in tasks.items():
        headline = HEADLINE.get(task)
        for key in per_set.get(name, {}) if headline else ():
            if key.startswith(headline) and key[len(headline):len(headline) + 1] in ("@", ":"):
                seen.setdefault(key[len(headline):], set()).add(name)
    scored = {name for name, task in tasks.items() if task in HEADLINE}
    return [suffix for suffix, names in seen.items() if names == scored]


def summary_metrics(per_set: Mapping[str, Mapping[str, float]], tasks: Mapping[str, str]) -> dict[str, float]:
    """`ir_avg` (mean nDCG@10 of IR sets), `sts_avg` (mean Spearman of STS sets), `avg` (mean of the two); the same
    with a suffix for each variant every set was scored at (`avg@64`: `headline_suffixes`)."""
    out: dict[str, float] = {}
    for suffix in [""] + headline_suffixes(per_set, tasks):
        part: dict[str, float] = {}
        for task in ("ir", "sts"):
            values = [per_set[name][HEADLINE[task] + suffix] for name, t in tasks.items() if t == task]
            if values:
                part[f"{task}_avg{suffix}"] = sum(values) / len(values)
        if part:
            part[f"avg{suffix}"] = sum(part.values()) / len(part)
        out.update(part)
    return out


def flat_metrics(per_set: Mapping[str, Mapping[str, float]], summary: Mapping[str, float],
                 prefix: str = "val/") -> dict[str, float]:
    """`{prefix}{set}/{metric}` and `{prefix}{summary}` keys, as logged and monitored."""
    flat = {f"{prefix}{name}/{metric}": value for name, values in per_set.items() for metric, value in values.items()}
    flat.update({f"{prefix}{key}": value for key, value in summary.items()})
    return flat


def metric_names(tasks: Mapping[str, str], prefix: str = "val/", dims: Sequence[int] = ()) -> list[str]:
    """Every key `flat_metrics` gives for sets named and tasked as `tasks` ({set: "ir" | "sts"}), known before
    anything is scored: the summaries (`{prefix}avg`, `{prefix}ir_avg`, `{prefix}sts_avg` as the tasks
    allow), then `{prefix}{set}/{metric}` for each set; then the same keys at each smaller trained width of
    `dims` (`...@64`, as validation logs them for `model.matryoshka_dims`)."""
    present = [task for task in ("ir", "sts") if task in tasks.values()]
    summary = ([f"{prefix}avg"] if present else []) + [f"{prefix}{task}_avg" for task in present]
    names = summary + [f"{prefix}{name}/{metric}" for name, task in tasks.items()
                       for metric in SET_METRIC_NAMES.get(task, ())]
    return names + [metric_key(name, dim) for dim in dims for name in names]


def set_embeddings(encoder, vset: EvalSet, batch_size: int = 64,
                   show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Embeddings of every text field of `vset` (`text1`/`text2` or `query`/`corpus`) by a `TextEncoder`,
    each field with its prefix (left out of pooling as in validation, see `TextEncoder.encode(prefix=...)`)."""
    return {name: encoder.encode(texts, batch_size=batch_size, prefix=vset.prefixes.get(name) or None,
                                 show_progress=show_progress)
            for name, texts in vset.texts.items()}


def evaluate_encoder(encoder, sets: list[EvalSet], batch_size: int = 64, show_progress: bool = False,
                     extra_metrics: Callable[[EvalSet, dict[str, torch.Tensor]], Mapping[str, float]]
                     | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-set metrics of a `TextEncoder` (`score_set`, plus `extra_metrics(vset, embeddings)` when given)
    and the `ir_avg` / `sts_avg` / `avg` summary."""
    per_set: dict[str, dict[str, float]] = {}
    for vset in sets:
        embeddings = set_embeddings(encoder, vset, batch_size, show_progress)
        per_set[vset.name] = dict(score_set(vset, embeddings))
        if extra_metrics is not None:
            per_set[vset.name].update(extra_metrics(vset, embeddings))
    return per_set, summary_metrics(per_set, {s.name: s.task for s in sets})
