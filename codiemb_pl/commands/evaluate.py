"""`codiemb evaluate`: score any model on STS pair files and BEIR folders, MTEB's metric names.

    codiemb evaluate --model runs/x/model --sts stsb=data/stsb_test.jsonl --ir scifact=data/scifact \
        --output results.json [--geometry] [--split test] [--sts-range 0 5] [--batch-size 64] [--max-length 256]

`--model` is a sentence-transformers folder, a Hugging Face folder, a hub id, `pkg://...`, or a Lightning
checkpoint (`.ckpt`; its `encoder.model.*` weights go into the encoder named by the checkpoint's
`model_name_or_path`, or by `--base`). The metrics are those of `evaluation.suite.score_set` (the
validation code of training); `--output` gets `{set: {metric: value}}` written atomically (NaN/inf
as null), and only after every set has been scored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import atomic_write_text
from ..cli import register_command
from ..data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from ..data.validation import ValidationSet
from ..device import add_device_argument, resolve_device
from ..encoder import TextEncoder
from ..errors import InputError
from ..evaluation.geometry import GEOMETRY_METRIC_NAMES, embedding_geometry, token_wise_similarity
from ..evaluation.suite import score_set, summary_metrics
from ..reporting import format_metrics_table

COMMAND = "codiemb evaluate"
CHECKPOINT_PREFIX = "encoder.model."
STS_POSITIVE_THRESHOLD = 0.8            # normalised gold score from which an STS pair counts as positive
TOKEN_SIMILARITY_SAMPLE = 256           # texts per set whose token states enter token-wise similarity
GEOMETRY_SEED = 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as an `InputError` (one line, exit code 2) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(COMMAND, message, f"see `{COMMAND} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=COMMAND, description="Score a model on STS pair files and BEIR retrieval folders.")
    parser.add_argument("--model", required=True,
                        help="sentence-transformers / Hugging Face folder, hub id, pkg://..., or a Lightning .ckpt")
    parser.add_argument("--base", help="model folder whose architecture a .ckpt's weights are loaded into "
                                       "(default: the checkpoint's model_name_or_path)")
    parser.add_argument("--sts", action="append", default=[], metavar="NAME=FILE",
                        help="STS pairs (sentence1, sentence2, score); repeatable")
    parser.add_argument("--sts-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="score scale of every --sts file (default per file: [0, 1] if all scores lie in it, "
                             "else [0, 5])")
    parser.add_argument("--ir", action="append", default=[], metavar="NAME=DIR",
                        help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); repeatable")
    parser.add_argument("--split", default="test", help="qrels split of the --ir folders (default: test)")
    parser.add_argument("--output", help="write {set: {metric: value}} to this JSON file")
    parser.add_argument("--geometry", action="store_true",
                        help="add token similarity, numerical rank, SVD entropy, condition number, anisotropy, "
                             "alignment and uniformity to every set")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch (default: 64)")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    add_device_argument(parser)
    return parser


def parse_named(value: str, flag: str) -> tuple[str, str]:
    """Split `NAME=PATH`; both parts must be non-empty."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise InputError(f"{flag} {value}", "expected NAME=PATH", f"e.g. {flag} stsb=data/stsb_test.jsonl")
    return name.strip(), path.strip()


def load_sets(sts: Sequence[str], ir: Sequence[str], sts_range: Sequence[float] | None,
              split: str) -> list[ValidationSet]:
    """Read and validate every `--sts` / `--ir` set (before any model is loaded)."""
    named = [(*parse_named(v, "--sts"), "sts") for v in sts] + [(*parse_named(v, "--ir"), "ir") for v in ir]
    if not named:
        raise InputError(COMMAND, "no evaluation set given", "add --sts NAME=FILE and/or --ir NAME=DIR")
    seen: set[str] = set()
    sets = []
    for name, path, task in named:
        if name in seen:
            raise InputError(f"{COMMAND} {name}", "two sets share this name", "give every set its own NAME")
        seen.add(name)
        if task == "sts":
            source = SourceConfig(name=name, task="sts", path=path,
                                  score_range=list(sts_range) if sts_range else None)
            sets.append(ValidationSet.from_sts(name, load_sts_pairs(source)))
        else:
            source = SourceConfig(name=name, task="ir", path=path, split=split)
            sets.append(ValidationSet.from_ir(name, load_ir_corpus(source)))
    return sets


def load_model(model: str, base: str | None = None, max_length: int | None = None) -> TextEncoder:
    """A `TextEncoder` from a model folder / hub id, or from a Lightning checkpoint of `CoDiEmbModule`."""
    if not model.endswith(".ckpt"):
        if base is not None:
            raise InputError(f"--base {base}", "only applies to a .ckpt --model", "remove --base")
        return TextEncoder(model, max_seq_length=max_length)
    path = Path(model)
    if not path.is_file():
        raise InputError(model, "no such checkpoint file", "check the path to the .ckpt")
    try:  # Lightning checkpoints pickle their hyper-parameters: load only checkpoints you trust
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(model, f"cannot read the checkpoint ({type(exc).__name__}: {exc})",
                         "give a .ckpt written by `codiemb fit`") from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    hparams = (checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    weights = {key[len(CHECKPOINT_PREFIX):]: value for key, value in (state or {}).items()
               if key.startswith(CHECKPOINT_PREFIX)}
    if not weights:
        raise InputError(model, f"the checkpoint has no {CHECKPOINT_PREFIX}* weights",
                         "give a checkpoint of codiemb_pl's CoDiEmbModule")
    architecture = base or hparams.get("model_name_or_path")
    if not architecture:
        raise InputError(model, "the checkpoint does not name its base model (hyper_parameters.model_name_or_path)",
                         "pass --base PATH")
    encoder = TextEncoder(architecture, pooling=hparams.get("pooling"), normalize=hparams.get("normalize"),
                          max_seq_length=max_length if max_length is not None else hparams.get("max_seq_length"),
                          include_prompt=False)
    result = encoder.model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(model, f"weights do not fit {architecture} (missing {result.missing_keys[:3]}, "
                                f"unexpected {result.unexpected_keys[:3]})",
                         "pass --base with the model the checkpoint was trained from")
    return encoder


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


def set_geometry(encoder: TextEncoder, vset: ValidationSet, embeddings: dict[str, torch.Tensor],
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


def set_embeddings(encoder: TextEncoder, vset: ValidationSet, batch_size: int = 64,
                   show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Embeddings of every text field of `vset` (`text1`/`text2` or `query`/`corpus`), each with its prefix."""
    return {name: encoder.encode(texts, batch_size=batch_size, prompt=vset.prefixes.get(name) or None,
                                 show_progress=show_progress)
            for name, texts in vset.texts.items()}


def evaluate_sets(encoder: TextEncoder, sets: list[ValidationSet], batch_size: int = 64, geometry: bool = False,
                  show_progress: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-set metrics (`score_set`, plus geometry on request) and the `ir_avg` / `sts_avg` / `avg` summary."""
    per_set: dict[str, dict[str, float]] = {}
    for vset in sets:
        embeddings = set_embeddings(encoder, vset, batch_size, show_progress)
        per_set[vset.name] = dict(score_set(vset, embeddings))
        if geometry:
            per_set[vset.name].update(set_geometry(encoder, vset, embeddings, batch_size))
    return per_set, summary_metrics(per_set, {s.name: s.task for s in sets})


def geometry_table(per_set: dict[str, dict[str, float]]) -> str:
    """Geometry metrics, one row per set, in 4 significant digits (condition numbers span many decades)."""
    rows = {name: {m: v for m, v in values.items() if m in GEOMETRY_METRIC_NAMES} for name, values in per_set.items()}
    rows = {name: values for name, values in rows.items() if values}
    if not rows:
        return ""
    width = max(len(name) for name in rows)
    lines = ["geometry", f"{'set':<{width}}  " + "  ".join(f"{m:>16}" for m in GEOMETRY_METRIC_NAMES)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values.get(m, math.nan):>16.4g}" for m in GEOMETRY_METRIC_NAMES))
    return "\n".join(lines)


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def results_json(per_set: dict[str, dict[str, float]]) -> str:
    """`{set: {metric: value}}` as strict JSON (NaN and inf become null)."""
    data: dict[str, Any] = {name: {metric: _json_value(float(v)) for metric, v in values.items()}
                            for name, values in per_set.items()}
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


@register_command("evaluate")
def evaluate_command(argv: list[str]) -> int:
    """Run `codiemb evaluate` with `argv` (everything after the command name); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}", "must be at least 1", "e.g. --batch-size 64")
    if args.output is not None and Path(args.output).is_dir():
        raise InputError(f"--output {args.output}", "is a folder", "name a .json file")
    device = resolve_device(args.device)
    sets = load_sets(args.sts, args.ir, args.sts_range, args.split)
    encoder = load_model(args.model, args.base, args.max_length).to(device)
    per_set, summary = evaluate_sets(encoder, sets, args.batch_size, args.geometry, show_progress=sys.stderr.isatty())
    task_metrics = {name: {m: v for m, v in values.items() if m not in GEOMETRY_METRIC_NAMES}
                    for name, values in per_set.items()}
    print(format_metrics_table(task_metrics, summary, title=f"evaluation of {args.model}"), flush=True)
    if args.geometry:
        print(geometry_table(per_set), flush=True)
    if args.output is not None:
        atomic_write_text(args.output, results_json(per_set))
        print(f"wrote {args.output}", flush=True)
    return 0
