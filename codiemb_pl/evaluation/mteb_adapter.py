"""Run any of our encoders under MTEB (the optional `mteb` extra, mteb 2.x):

    import mteb
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.evaluation.mteb_adapter import MTEBEncoder

    model = MTEBEncoder(TextEncoder("runs/x/model"), prompts={"query": "query: ", "document": "passage: "})
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark", "SciFact"]), cache=None)

`MTEBEncoder` implements mteb's `EncoderProtocol`: `encode(inputs: DataLoader, *, task_metadata, hf_split,
hf_subset, prompt_type)` gathers every text of the loader (the `text` field mteb prepares: a document
is `title + " " + text`) and embeds them in one call of the wrapped `encode(sentences, **kwargs)` so the
wrapped encoder can sort the whole list by length. The wrapped object is anything with
`encode(sentences, batch_size=..., prompt=...)` returning an array or tensor: a `TextEncoder`, a
`SentenceTransformer`, a fused model.

Prompts (`prompts`, default: the wrapped encoder's own `prompts` dict) are chosen the way mteb documents
for sentence-transformers models, the first key present winning: `"{task name}-{prompt type}"`,
`"{task name}"`, `"{task type}-{prompt type}"`, `"{task type}"`, `"{prompt type}"`, where the prompt type
is `query` / `document` (retrieval) or absent (STS, classification, ...). The prompt text is passed as
`prompt=`, so a `TextEncoder` with `include_prompt=False` leaves its tokens out of pooling.
Similarity is cosine. `truncate_dim=D` hands mteb the first D dimensions of every embedding (a Matryoshka
width, as sentence-transformers' `truncate_dim`; cosine similarity re-normalises them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MTEBEncoder", "select_prompt"]

DEFAULT_BATCH_SIZE = 64


def _require_mteb():
    try:
        import mteb
    except ImportError as exc:  # the extra is optional: say how to get it
        raise ImportError("MTEB evaluation needs the optional extra: pip install 'codiemb_pl[mteb]'") from exc
    return mteb


def select_prompt(prompts: Mapping[str, str], task_name: str | None, task_type: str | None,
                  prompt_type: str | None) -> str | None:
    """The prompt of the most specific matching key (order in the module docstring), or None."""
    candidates = []
    if task_name and prompt_type:
        candidates.append(f"{task_name}-{prompt_type}")
    if task_name:
        candidates.append(task_name)
    if task_type and prompt_type:
        candidates.append(f"{task_type}-{prompt_type}")
    if task_type:
        candidates.append(task_type)
    if prompt_type:
        candidates.append(prompt_type)
    return next((prompts[key] for key in candidates if key in prompts), None)


def _texts_of(inputs: Iterable[Mapping[str, Any]] | Iterable[str]) -> list[str]:
    """Every text of an mteb DataLoader (batches with a `text` list), or a plain list of strings."""
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        else:
            texts.extend(item["text"])
    return texts


def _as_float_tensor(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).float()


def _as_rows(values: Any) -> torch.Tensor:
    """A `[n, d]` float tensor (a single `[d]` vector becomes one row)."""
    tensor = _as_float_tensor(values)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


class MTEBEncoder:
    """An mteb `EncoderProtocol` around any `encode(sentences, **kwargs)` encoder (see module docstring)."""

    def __init__(self, encoder: Any, name: str = "codiemb_pl/model", revision: str | None = None,
                 prompts: Mapping[str, str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 truncate_dim: int | None = None):
        self.encoder = encoder
        self.name, self.revision = name, revision
        self.prompts: dict[str, str] = dict(prompts if prompts is not None else getattr(encoder, "prompts", {}) or {})
        self.batch_size = batch_size
        full = getattr(encoder, "embedding_dim", None)
        if truncate_dim is not None:
            from codiemb_pl.model.widths import check_dims

            check_dims([truncate_dim], "MTEBEncoder(truncate_dim=...)", full)
        self.truncate_dim = truncate_dim

    @property
    def mteb_model_meta(self):
        """mteb's `ModelMeta` for this model: name, revision, dimension, length limit, cosine similarity."""
        _require_mteb()
        from mteb.models import ModelMeta
        from mteb.models.model_meta import ScoringFunction

        return ModelMeta.create_empty(overwrites=dict(
            name=self.name, revision=self.revision,
            embed_dim=self.truncate_dim or getattr(self.encoder, "embedding_dim", None),
            max_tokens=getattr(self.encoder, "max_seq_length", None), similarity_fn_name=ScoringFunction.COSINE,
            framework=["PyTorch"]))

    def prompt_for(self, task_metadata: Any, prompt_type: Any = None) -> str | None:
        """The prompt for a task (`task_metadata.name`, `.type`) and prompt type (`query`/`document`/None)."""
        kind = getattr(prompt_type, "value", prompt_type)
        return select_prompt(self.prompts, getattr(task_metadata, "name", None), getattr(task_metadata, "type", None),
                             kind)

    def encode(self, inputs: Iterable[Any], *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embed every text of `inputs` as a float32 `[n, d]` array (input order)."""
        texts = _texts_of(inputs)
        prompt = self.prompt_for(task_metadata, prompt_type)
        options: dict[str, Any] = {"batch_size": int(kwargs.get("batch_size") or self.batch_size)}
        if prompt:
            options["prompt"] = prompt
        embeddings = _as_float_tensor(self.encoder.encode(texts, **options))
        if self.truncate_dim is not None:
            embeddings = embeddings[..., :self.truncate_dim]
        return embeddings.cpu().numpy().astype(np.float32, copy=False)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity matrix `[n1, n2]`."""
        return F.normalize(_as_rows(embeddings1), dim=-1) @ F.normalize(_as_rows(embeddings2), dim=-1).T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Row-wise cosine similarity `[n]`."""
        return F.cosine_similarity(_as_rows(embeddings1), _as_rows(embeddings2), dim=-1)
