"""The README (model card) of an exported sentence-transformers folder.

`build_model_card(...)` turns what is known about a model — base model, training data, sampler policy,
losses, fusion method and weights, validation metrics, encoder settings — into Markdown with a
Hugging Face metadata header. It is plain text in, text out: the export callback and the fusion code
both call it. The machine-readable sentence-transformers metadata (prompts, similarity function)
lives in `config_sentence_transformers.json`, which `TextEncoder.save` writes; the card repeats it for people.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

DEFAULT_TITLE = "CoDiEmb text encoder"
CARD_TAGS = ("sentence-transformers", "sentence-similarity", "feature-extraction", "codiemb")


def encoder_card_fields(encoder: Any) -> dict[str, Any]:
    """The card fields a `TextEncoder` knows about itself (pooling, length, prompts, ...)."""
    return {"embedding_dim": encoder.embedding_dim, "max_seq_length": encoder.max_seq_length,
            "pooling": encoder.pooling, "normalize": encoder.normalize, "prompts": dict(encoder.prompts),
            "default_prompt_name": encoder.default_prompt_name, "kept_layers": getattr(encoder, "kept_layers", None),
            "matryoshka_dims": list(getattr(encoder, "matryoshka_dims", None) or [])}


def build_model_card(*, base_model: str, title: str = DEFAULT_TITLE, summary: str = "",
                     training_data: Sequence[Mapping[str, Any]] = (), sampler_policy: Optional[str] = None,
                     losses: Optional[Mapping[str, Any]] = None, fusion: Optional[Mapping[str, Any]] = None,
                     validation_metrics: Optional[Mapping[str, float]] = None, metrics_source: str = "",
                     embedding_dim: Optional[int] = None, max_seq_length: Optional[int] = None,
                     pooling: Optional[str] = None, normalize: Optional[bool] = None,
                     prompts: Optional[Mapping[str, str]] = None, default_prompt_name: Optional[str] = None,
                     similarity_fn_name: str = "cosine", model_path: str = "path/to/this/folder",
                     kept_layers: Optional[Sequence[int]] = None, matryoshka_dims: Sequence[int] = ()) -> str:
    """Markdown model card with a YAML header (library, base model, tags).

    Args:
        training_data: one mapping per sub-dataset (`name`, `task`, `path`, optional `split`, `instruction`,
            `batch_size`, `max_samples`).
        losses: e.g. `{"ir": {...}, "sts": {...}}`; each value a mapping of settings or a sentence.
        fusion: `{"method": ..., "checkpoints": [...], "weights": [...] or {...}, "params": {...}}` when fused.
        validation_metrics: flat `val/...` metrics of the exported weights; `metrics_source` says which run
            or checkpoint they come from.
        kept_layers: the base model's transformer blocks the model keeps (`model.num_layers`), None = all.
        matryoshka_dims: the Matryoshka widths the weights were trained at (a row of the model table and a
            `truncate_dim` line in the usage).
    """
    sections = [_front_matter(base_model), f"# {title}", "",
                summary or _default_summary(base_model, fusion), "",
                _model_section(base_model, embedding_dim, max_seq_length, pooling, normalize, similarity_fn_name,
                               prompts, default_prompt_name, kept_layers, matryoshka_dims)]
    if training_data or sampler_policy:
        sections.append(_data_section(training_data, sampler_policy))
    if losses:
        sections.append(_losses_section(losses))
    if fusion:
        sections.append(_fusion_section(fusion))
    sections.append(_metrics_section(validation_metrics, metrics_source))
    sections.append(_usage_section(model_path, prompts, default_prompt_name, similarity_fn_name, matryoshka_dims))
    return "\n".join(sections).rstrip() + "\n"


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value)  # a JSON scalar is a valid YAML scalar (quotes, escapes)


def _front_matter(base_model: str) -> str:
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             f"base_model: {_yaml_scalar(base_model)}", "tags:"]
    lines += [f"- {tag}" for tag in CARD_TAGS]
    lines += ["---", ""]
    return "\n".join(lines)


def _default_summary(base_model: str, fusion: Optional[Mapping[str, Any]]) -> str:
    text = (f"A sentence embedding model fine-tuned from `{base_model}` with codiemb_pl for both information "
            "retrieval (IR) and semantic textual similarity (STS), following CoDiEmb's recipe "
            "(single-task batches, task-specific losses).")
    if fusion:
        text += f" Its weights are a fusion of checkpoints ({fusion.get('method', 'unknown method')})."
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple, dict)):
        return "`" + json.dumps(value, default=str) + "`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _model_section(base_model: str, embedding_dim, max_seq_length, pooling, normalize, similarity_fn_name,
                   prompts, default_prompt_name, kept_layers=None,
                   matryoshka_dims=()) -> str:
    rows = [("base model", f"`{base_model}`"),
            ("base model layers kept", None if kept_layers is None else list(kept_layers)),
            ("embedding dimension", embedding_dim),
            ("maximum sequence length", max_seq_length), ("pooling", pooling),
            ("L2-normalised", normalize), ("similarity function", similarity_fn_name),
            ("Matryoshka widths (trained)", ", ".join(map(str, matryoshka_dims)) if matryoshka_dims else None)]
    rows = [row for row in rows if row[1] is not None]
    text = "## Model\n\n" + _table(["setting", "value"], rows)
    if prompts:
        text += "\nPrompts (`prompt_name` in `encode`): " + ", ".join(
            f"`{name}` = `{prompt}`" for name, prompt in prompts.items())
        text += f"; default: `{default_prompt_name}`.\n" if default_prompt_name else ".\n"
        roles = [f"`{name}` ({use})" for name, use in (("query", "`encode_query`"), ("document", "`encode_document`"))
                 if name in prompts]
        if roles:
            text += ("sentence-transformers applies " + " and ".join(roles) + " by itself; with codiemb_pl `query` is "
                     "the instruction of the first IR training sub-dataset that has one, `document` the passage "
                     "prefix.\n")
    return text


def _data_section(training_data: Sequence[Mapping[str, Any]], sampler_policy: Optional[str]) -> str:
    text = "## Training data\n\n"
    if training_data:
        columns = ["name", "task", "path", "split", "instruction", "batch_size", "max_samples"]
        used = [c for c in columns if any(entry.get(c) is not None for entry in training_data)]
        text += _table(used, [[entry.get(c) for c in used] for entry in training_data])
    if sampler_policy:
        text += (f"\nSampler policy: `{sampler_policy}` (every optimizer step draws one task and one sub-dataset "
                 "on every device).\n")
    return text


def _losses_section(losses: Mapping[str, Any]) -> str:
    lines = ["## Losses", ""]
    for task, setting in losses.items():
        if isinstance(setting, Mapping):
            lines.append(f"- **{task}**: " + ", ".join(f"{key} = {_cell(value)}" for key, value in setting.items()))
        else:
            lines.append(f"- **{task}**: {setting}")
    return "\n".join(lines) + "\n"


def _fusion_section(fusion: Mapping[str, Any]) -> str:
    lines = ["## Fusion", "", f"Method: `{fusion.get('method', 'unknown')}`."]
    checkpoints = list(fusion.get("checkpoints") or [])
    weights = fusion.get("weights")
    if isinstance(weights, Mapping):
        checkpoints = checkpoints or list(weights)
        weights = [weights[name] for name in checkpoints]
    if checkpoints:
        weight_column = list(weights) if weights is not None and len(weights) == len(checkpoints) else None
        rows = [[name, weight_column[index] if weight_column else None] for index, name in enumerate(checkpoints)]
        lines += ["", _table(["checkpoint", "weight"], rows)]
    elif weights is not None:
        lines.append(f"Weights: {_cell(list(weights))}.")
    params = fusion.get("params")
    if params:
        lines.append("Parameters: " + ", ".join(f"{key} = {_cell(value)}" for key, value in params.items()) + ".")
    return "\n".join(lines).rstrip() + "\n"


def _metrics_section(metrics: Optional[Mapping[str, float]], source: str) -> str:
    if not metrics:
        return "## Validation metrics\n\nNo validation set was configured.\n"
    text = "## Validation metrics\n\n"
    if source:
        text += f"Measured on {source}.\n\n"
    return text + _table(["metric", "value"], [(f"`{key}`", float(metrics[key])) for key in sorted(metrics)])


def _usage_section(model_path: str, prompts, default_prompt_name, similarity_fn_name: str,
                   matryoshka_dims: Sequence[int] = ()) -> str:
    lines = ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = SentenceTransformer({model_path!r})"]
    if matryoshka_dims:
        smallest = min(matryoshka_dims)
        lines.append(f"# trained for truncation: SentenceTransformer({model_path!r}, truncate_dim={smallest}) keeps "
                     f"the first {smallest} dimensions (trained widths: {', '.join(str(d) for d in matryoshka_dims)})")
    query_call = "encode_query" if prompts and "query" in prompts else "encode"
    document_call = "encode_document" if prompts and "document" in prompts else "encode"
    if prompts and query_call == "encode":
        name = default_prompt_name or next(iter(prompts))
        lines.append(f"queries = model.encode([\"how do I blanch vegetables?\"], prompt_name={name!r})")
    else:
        lines.append(f"queries = model.{query_call}([\"how do I blanch vegetables?\"])"
                     + ("  # the `query` prompt" if query_call != "encode" else ""))
    lines += [f"documents = model.{document_call}([\"Blanching means boiling vegetables briefly.\"])"
              + ("  # the `document` prompt" if document_call != "encode" else ""),
              f"print(model.similarity(queries, documents))  # {similarity_fn_name} similarity", "```", "",
              "With codiemb_pl: `from codiemb_pl.model.encoder import TextEncoder; TextEncoder.load(path).encode(texts)`."]
    return "\n".join(lines) + "\n"


def build_fused_model_card(*, base_model: str, method: str, inputs: Sequence[str],
                           weights: Optional[Sequence[float]] = None, params: Optional[Mapping[str, Any]] = None,
                           scores: Optional[Mapping[str, float]] = None, scores_source: str = "",
                           leaderboard: str = "", **encoder_fields: Any) -> str:
    """The card of a fused output (`codiemb fuse --output`, a fusion folder's `model/`): the merge method, its
    inputs, their weights, the method's parameters and the validation scores (`leaderboard`: a Markdown
    table of every candidate, when there was one). `encoder_fields` as `encoder_card_fields` returns them."""
    card = build_model_card(base_model=base_model, title="CoDiEmb fused text encoder",
                            fusion={"method": method, "checkpoints": list(inputs), "weights": weights,
                                    "params": dict(params or {})},
                            validation_metrics=scores, metrics_source=scores_source, **encoder_fields)
    if leaderboard:
        card = card.replace("## Usage", f"## Fusion leaderboard\n\n{leaderboard.rstrip()}\n\n## Usage", 1)
    return card
