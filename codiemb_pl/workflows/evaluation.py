"""Score a model on evaluation sets: what `codiemb evaluate` does, for commands, benchmarks and notebooks.

    from codiemb_pl.workflows.evaluation import evaluate, load_sets
    sets = load_sets(["stsb=data/stsb_test.jsonl"], ["scifact=data/scifact"], split="test")
    per_set, summary = evaluate("runs/x/model", sets, geometry=True)

Metrics are `evaluation.suite.score_set`'s (the validation code of training), MTEB's names; with
`geometry`, each set also gets token similarity, numerical rank, SVD entropy, condition number,
anisotropy, alignment and uniformity (`evaluation.geometry`). Instruction prefixes are left out of
pooling exactly as validation does, so a checkpoint scores here what it scored during training.

With `dims` (Matryoshka widths) and `precisions` (`int8`, `binary`), the same embeddings are also scored at each
width x precision (`evaluation.variants`: keys `metric@m`, `metric@m:int8`, ...), from one encoding pass; int8
ranges come from `calibration_texts` (training texts, never the test corpus).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from codiemb_pl.data.eval_builders import build_eval_sets
from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.evaluation.compact import PRECISIONS, bytes_per_vector
from codiemb_pl.evaluation.geometry import embedding_geometry, token_wise_similarity
from codiemb_pl.evaluation.suite import evaluate_encoder, set_embeddings
from codiemb_pl.evaluation.tables import BYTES_PER_VECTOR
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.widths import check_width, metric_key
from codiemb_pl.workflows.encoders import load_encoder, on_device

__all__ = ["evaluate", "evaluate_sets", "load_sets", "parse_named", "set_embeddings", "set_geometry"]

EVALUATE = "codiemb evaluate"
STS_POSITIVE_THRESHOLD = 0.8            # normalised gold score from which an STS pair counts as positive
TOKEN_SIMILARITY_SAMPLE = 256           # texts per set whose token states enter token-wise similarity
GEOMETRY_SEED = 0


def parse_named(value: str, flag: str, shape: str = "NAME=PATH",
                example: str = "stsb=data/stsb_test.jsonl") -> tuple[str, str]:
    """Split a `NAME=VALUE` argument given to `flag`; both parts must be non-empty."""
    name, sep, rest = value.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise InputError(f"{flag} {value}", f"expected {shape}", f"e.g. {flag} {example}")
    return name.strip(), rest.strip()


def load_sets(sts: Sequence[str], ir: Sequence[str], sts_range: Sequence[float] | None = None, split: str = "test",
              instructions: Sequence[str] = (), instruction_template: str = INSTRUCTION_TEMPLATE,
              passage_prefix: str = "") -> list[EvalSet]:
    """Read and check every `NAME=FILE` STS set and `NAME=DIR` BEIR set (before any model is loaded).

    `instructions` are `NAME=TEXT` (the set NAME's instruction, made a prefix by `instruction_template` as
    `data.instruction_template` does in training); `passage_prefix` goes before every IR document.
    """
    named = [(*parse_named(v, "--sts"), "sts") for v in sts] + [(*parse_named(v, "--ir"), "ir") for v in ir]
    if not named:
        raise InputError(EVALUATE, "no evaluation set given", "add --sts NAME=FILE and/or --ir NAME=DIR")
    given: dict[str, str] = {}
    for value in instructions:
        name, text = parse_named(value, "--instruction", "NAME=TEXT", "scifact='Given a claim, find evidence'")
        if name not in {set_name for set_name, _, _ in named}:
            raise InputError(f"--instruction {value}", f"no --sts / --ir set is named {name!r}",
                             "use the NAME of one of the sets")
        if name in given:
            raise InputError(f"--instruction {value}", f"a second instruction for {name!r}", "give one per set")
        given[name] = text
    sources = [SourceConfig(name=name, task="sts", path=path, score_range=list(sts_range) if sts_range else None,
                            instruction=given.get(name)) if task == "sts" else
               SourceConfig(name=name, task="ir", path=path, split=split, instruction=given.get(name))
               for name, path, task in named]
    return build_eval_sets(sources, instruction_template=instruction_template, passage_prefix=passage_prefix,
                                 where=EVALUATE)


def token_states(encoder: TextEncoder, texts: list[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Last-layer token states and attention masks of `texts`, batch by batch (no grad, eval mode)."""
    out = []
    encoder.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            features = {k: v.to(encoder.device) for k, v in encoder.tokenize(texts[start:start + batch_size]).items()}
            inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            states = encoder.model(**inputs, return_dict=True).last_hidden_state
            out.append((states.float().cpu(), features["attention_mask"].cpu()))
    return out


def set_geometry(encoder: TextEncoder, vset: EvalSet, embeddings: Mapping[str, torch.Tensor],
                 batch_size: int) -> dict[str, float]:
    """Geometry of one set: all its embeddings; positives = STS pairs with gold ≥ 0.8 or judged (query, doc)."""
    if vset.task == "sts":
        keep = torch.tensor(vset.gold) >= STS_POSITIVE_THRESHOLD
        positives_x, positives_y = embeddings["text1"][keep], embeddings["text2"][keep]
    else:
        query_row = {qid: i for i, qid in enumerate(vset.query_ids)}
        doc_row = {did: i for i, did in enumerate(vset.doc_ids)}
        pairs = [(query_row[q], doc_row[d]) for q, docs in vset.qrels.items() for d, rel in docs.items()
                 if rel > 0 and q in query_row and d in doc_row]
        positives_x = embeddings["query"][[q for q, _ in pairs]]
        positives_y = embeddings["corpus"][[d for _, d in pairs]]
    metrics = embedding_geometry(torch.cat(list(embeddings.values())), positives_x, positives_y, seed=GEOMETRY_SEED)

    texts = [text for field in vset.texts.values() for text in field]
    generator = torch.Generator().manual_seed(GEOMETRY_SEED)
    sample = [texts[i] for i in torch.randperm(len(texts), generator=generator)[:TOKEN_SIMILARITY_SAMPLE].tolist()]
    per_batch = token_states(encoder, sample, batch_size)
    weights = [int((mask.sum(dim=1) >= 2).sum()) for _, mask in per_batch]
    values = [token_wise_similarity(states, mask) for states, mask in per_batch]
    used = [(w, v) for w, v in zip(weights, values) if w > 0]
    metrics["token_similarity"] = (sum(w * v for w, v in used) / sum(w for w, _ in used)) if used else math.nan
    return metrics


def evaluate_sets(encoder: TextEncoder, sets: list[EvalSet], batch_size: int = 64, geometry: bool = False,
                  show_progress: bool = False, dims: Sequence[int] = (), precisions: Sequence[str] = ("float32",),
                  calibration_texts: Sequence[str] = ()) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-set metrics (`score_set`, plus geometry on request, plus each width x precision of `dims` x `precisions`
    with its `bytes_per_vector@m:precision`) and the `ir_avg` / `sts_avg` / `avg` summary (with a suffix per
    variant: `avg@64:int8`)."""
    variants, ranges = compact_variants(encoder, dims, precisions, calibration_texts, batch_size)
    full = encoder.embedding_dim

    def extra(vset: EvalSet, embeddings: Mapping[str, torch.Tensor]) -> dict[str, float]:
        out = set_geometry(encoder, vset, embeddings, batch_size) if geometry else {}
        if variants:
            from codiemb_pl.evaluation.variants import variant_metrics

            out.update(variant_metrics(vset, embeddings, variants, ranges))
            out.update({metric_key(BYTES_PER_VECTOR, dim, precision): float(bytes_per_vector(dim or full, precision))
                        for dim, precision in [(None, "float32"), *variants]})
        return out

    return evaluate_encoder(encoder, sets, batch_size, show_progress,
                            extra_metrics=extra if geometry or variants else None)


def compact_variants(encoder: TextEncoder, dims: Sequence[int], precisions: Sequence[str],
                     calibration_texts: Sequence[str], batch_size: int
                     ) -> tuple[list[tuple[int | None, str]], dict[int | None, torch.Tensor]]:
    """The (width, precision) pairs to score besides full-width float32, and the int8 ranges per width calibrated
    on `calibration_texts` (checked: widths within the model's, known precisions, texts when int8 is asked)."""
    full = encoder.embedding_dim
    widths = [None] + [check_width(dim, full, "--truncate-dim") for dim in dims if dim != full]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise InputError(f"--precision {unknown[0]}", "unknown precision", f"use {', '.join(PRECISIONS)}")
    variants = [(dim, precision) for dim in dict.fromkeys(widths) for precision in dict.fromkeys(precisions)
                if (dim, precision) != (None, "float32")]
    if not any(precision == "int8" for _, precision in variants):
        return variants, {}
    if len(calibration_texts) < 2:
        raise InputError("--precision int8", "int8 needs its ranges calibrated on training texts",
                         "pass --calibration FILE (texts from the training data, at least 2; never the test corpus)")
    from codiemb_pl.evaluation.variants import calibration_ranges

    calibration = encoder.encode(list(calibration_texts), batch_size=batch_size)
    return variants, calibration_ranges(calibration, [dim for dim in dict.fromkeys(widths)])


def evaluate(model: str | Path | TextEncoder, sets: Sequence[EvalSet | SourceConfig | Mapping[str, Any]], *,
             base: str | None = None, device: str | torch.device | None = None, batch_size: int = 64,
             max_seq_length: int | None = None, geometry: bool = False, show_progress: bool = False,
             dims: Sequence[int] = (), precisions: Sequence[str] = ("float32",),
             calibration_texts: Sequence[str] = ()) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Score `model` (a `TextEncoder`, or anything `load_encoder` reads) on `sets`.

    `sets` are `EvalSet`s or source configs (`SourceConfig`s or mappings, built with
    `build_eval_sets`: read and checked before the model is loaded). Returns `({set: {metric:
    value}}, {"ir_avg", "sts_avg", "avg"})`; with `dims` / `precisions`, also every width x precision
    (module docstring).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}", "must be at least 1", "e.g. --batch-size 64")
    ready = [entry for entry in sets if isinstance(entry, EvalSet)]
    if len(ready) != len(sets):
        if ready:
            raise InputError(EVALUATE, "sets mix EvalSets and source configs", "pass one kind")
        ready = build_eval_sets(sets, where=EVALUATE)
    encoder = on_device(model, device) if isinstance(model, TextEncoder) else \
        load_encoder(model, base, device, max_seq_length)
    return evaluate_sets(encoder, ready, batch_size, geometry, show_progress, dims, precisions, calibration_texts)
