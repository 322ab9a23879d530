"""A teacher model: scores (and, for a bi-encoder, embeddings) that a student learns from (SPEC §10).

Two kinds, loaded by `load_teacher(TeacherSettings(...))` and run without gradients with their own batch
size, dtype, maximum length and prompts:

- `BiEncoderTeacher`: a sentence-transformers or Hugging Face folder (hub id, `pkg://` model) embedded by
  `TextEncoder`; the score of (q, d) is the cosine cos(e_T(q), e_T(d)), mapped to [0, 1] by clipping at 0
  (`unit_scores`); `embed(texts, role)` gives its embeddings (embedding distillation).
- `CrossEncoderTeacher`: a `...ForSequenceClassification` folder with one output (a reranker); the score of
  (q, d) is its logit on the pair, mapped to [0, 1] by a sigmoid.

One API serves training (the online teacher, `training/teacher_signal.py`) and teacher-aware mining:
`score_candidates(queries, candidates)` (each query against its own list of candidate texts),
`pair_scores(first, second)` (row-wise pairs) and `unit_scores(raw)`. Scores come back as float32 CPU
tensors in input order; identical texts are embedded once. The teacher is a plain object, never a submodule of
the student (no optimizer, checkpoint or DDP/FSDP wrapping sees it); `to(device)` moves its model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.model.st_folder import read_model_json, read_modules
from codiemb_pl.paths import resolve_location

TEACHER_KINDS = ("auto", "bi_encoder", "cross_encoder")
ROLES = ("query", "document")


@dataclass
class TeacherSettings:
    """A teacher model and how it runs (`model.distillation.teacher`; teacher-aware mining).

    Attributes:
        model: a bi-encoder (sentence-transformers or Hugging Face folder, hub id, pkg:// model) or a
            cross-encoder folder (a ...ForSequenceClassification model with one output).
        kind: auto (read from the folder: ...ForSequenceClassification is a cross-encoder), bi_encoder or
            cross_encoder.
        batch_size: texts (bi-encoder) or pairs (cross-encoder) per forward pass.
        dtype: None (float32), auto (the checkpoint's), float32, float16 or bfloat16.
        max_seq_length: maximum tokens per text (pair); None: the model's own limit.
        query_prompt: text put before queries and both STS sentences; None: the bi-encoder folder's `query`
            prompt (none for a cross-encoder).
        document_prompt: text put before documents; None: the bi-encoder folder's `document` prompt.
        trust_remote_code: run the model repository's own code.
    """

    model: str
    kind: Literal["auto", "bi_encoder", "cross_encoder"] = "auto"
    batch_size: int = 64
    dtype: Optional[str] = None
    max_seq_length: Optional[int] = None
    query_prompt: Optional[str] = None
    document_prompt: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        where = "model.distillation.teacher"
        if not self.model:
            raise InputError(f"{where}.model", "no teacher model given", "name a model folder, hub id or pkg:// model")
        if self.kind not in TEACHER_KINDS:
            raise InputError(f"{where}.kind", f"unknown kind {self.kind!r}", f"use one of {', '.join(TEACHER_KINDS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"{where}.batch_size", f"must be a positive integer, got {self.batch_size!r}", "e.g. 64")


def _unique_rows(texts: Sequence[str]) -> tuple[list[str], Tensor]:
    """(distinct texts in first-seen order, index of each input text among them)."""
    position: dict[str, int] = {}
    rows = [position.setdefault(text, len(position)) for text in texts]
    return list(position), torch.tensor(rows, dtype=torch.long)


class BiEncoderTeacher:
    """A `TextEncoder` as teacher: cosine scores, embeddings by role (see the module docstring)."""

    kind = "bi_encoder"

    def __init__(self, settings: TeacherSettings):
        from codiemb_pl.model.encoder import TextEncoder

        self.settings = settings
        self.encoder = TextEncoder(settings.model, max_seq_length=settings.max_seq_length, dtype=settings.dtype,
                                   trust_remote_code=settings.trust_remote_code)
        self.encoder.requires_grad_(False)
        self.name = self.encoder.name_or_path
        self.prompts = {"query": settings.query_prompt if settings.query_prompt is not None
                        else self.encoder.prompts.get("query", ""),
                        "document": settings.document_prompt if settings.document_prompt is not None
                        else self.encoder.prompts.get("document", "")}

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def to(self, device: torch.device | str) -> "BiEncoderTeacher":
        if self.encoder.device != torch.device(device):
            self.encoder.to(device)
        return self

    def embed(self, texts: Sequence[str], role: str = "query") -> Tensor:
        """Embeddings [n, d] (float32, CPU, the teacher's own normalisation) of `texts` with the `role`'s prompt;
        each distinct text is embedded once."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not texts:
            return torch.zeros(0, self.embedding_dim)
        distinct, rows = _unique_rows(texts)
        embeddings = self.encoder.encode(distinct, batch_size=self.settings.batch_size, prompt=self.prompts[role])
        return embeddings[rows]

    def score_candidates(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[Tensor]:
        """For query i, the cosines [len(candidates[i])] to its own candidate documents."""
        query_units = torch.nn.functional.normalize(self.embed(queries, "query"), dim=-1)
        flat = [text for texts in candidates for text in texts]
        document_units = torch.nn.functional.normalize(self.embed(flat, "document"), dim=-1)
        scores, start = [], 0
        for row, texts in enumerate(candidates):
            scores.append(document_units[start:start + len(texts)] @ query_units[row])
            start += len(texts)
        return scores

    def pair_scores(self, first: Sequence[str], second: Sequence[str]) -> Tensor:
        """cos(e(first_i), e(second_i)) [n]; both sides take the query prompt (STS pairs, SPEC §1)."""
        units = torch.nn.functional.normalize(self.embed(list(first) + list(second), "query"), dim=-1)
        return (units[:len(first)] * units[len(first):]).sum(dim=-1)

    @staticmethod
    def unit_scores(raw: Tensor) -> Tensor:
        """Cosines mapped to [0, 1]: clipped at 0 (a negative cosine is as dissimilar as 0)."""
        return raw.clamp(0.0, 1.0)


class CrossEncoderTeacher:
    """A sequence-classification model with one logit as teacher (see the module docstring)."""

    kind = "cross_encoder"

    def __init__(self, settings: TeacherSettings):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from codiemb_pl.model.hf_loading import resolve_dtype   # the dtype names TextEncoder takes
        from codiemb_pl.storage.weight_checks import check_finite_state, check_model_folder, weights_location

        self.settings = settings
        location = resolve_location(settings.model)
        if Path(location).is_dir():
            check_model_folder(location)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                location, dtype=resolve_dtype(settings.dtype), trust_remote_code=settings.trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=settings.trust_remote_code)
        except OSError as exc:
            raise InputError(settings.model, f"could not load the cross-encoder ({exc})",
                             "give a local folder or a cached hub id of a sequence-classification model") from exc
        if self.model.config.num_labels != 1:
            raise InputError(settings.model, f"the cross-encoder has {self.model.config.num_labels} outputs, not one "
                             "relevance logit", "use a reranker with one output (num_labels: 1)")
        check_finite_state(self.model.state_dict(), weights_location(location) if Path(location).is_dir() else location)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        self.name = location
        limits = [512, self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 512)]
        self.max_length = settings.max_seq_length or int(min(limit for limit in limits if isinstance(limit, int)))
        self.prompts = {"query": settings.query_prompt or "", "document": settings.document_prompt or ""}

    def to(self, device: torch.device | str) -> "CrossEncoderTeacher":
        if next(self.model.parameters()).device != torch.device(device):
            self.model.to(device)
        return self

    def pair_scores(self, first: Sequence[str], second: Sequence[str]) -> Tensor:
        """The logit [n] of each pair (prompt + first_i, prompt + second_i), in batches of similar length."""
        if len(first) != len(second):
            raise ValueError(f"{len(first)} first texts but {len(second)} second texts")
        pairs = [(self.prompts["query"] + a, self.prompts["document"] + b) for a, b in zip(first, second)]
        order = sorted(range(len(pairs)), key=lambda index: -len(pairs[index][0]) - len(pairs[index][1]))
        device = next(self.model.parameters()).device
        size, chunks = self.settings.batch_size, []
        with torch.inference_mode():
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                features = self.tokenizer([pairs[i][0] for i in rows], [pairs[i][1] for i in rows], padding=True,
                                          truncation=True, max_length=self.max_length, return_tensors="pt")
                chunks.append(self.model(**{key: value.to(device) for key, value in features.items()}).logits[:, 0]
                              .float().cpu())
        scores = torch.empty(len(pairs), dtype=torch.float32)   # an ordinary tensor (not an inference one)
        if chunks:
            scores[torch.tensor(order, dtype=torch.long)] = torch.cat(chunks)
        return scores

    def score_candidates(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[Tensor]:
        """For query i, the logits [len(candidates[i])] of (query i, each of its candidates)."""
        flat = self.pair_scores([query for query, texts in zip(queries, candidates) for _ in texts],
                                [text for texts in candidates for text in texts])
        return list(torch.split(flat, [len(texts) for texts in candidates]))

    @staticmethod
    def unit_scores(raw: Tensor) -> Tensor:
        """Logits mapped to [0, 1] by a sigmoid."""
        return torch.sigmoid(raw)


Teacher = BiEncoderTeacher | CrossEncoderTeacher


def teacher_kind(settings: TeacherSettings) -> str:
    """`bi_encoder` or `cross_encoder`: as set, or (auto) from the folder: a sentence-transformers folder
    (modules.json) is a bi-encoder, a config whose architectures end in ForSequenceClassification a cross-encoder."""
    if settings.kind != "auto":
        return settings.kind
    location = resolve_location(settings.model)
    is_local = Path(location).is_dir()
    if read_modules(location, is_local) is not None:
        return "bi_encoder"
    config = read_model_json(location, "config.json", is_local) or {}
    if any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or ()):
        return "cross_encoder"
    return "bi_encoder"


def load_teacher(settings: TeacherSettings | dict, device: torch.device | str | None = None) -> Teacher:
    """The teacher `settings` name, in eval mode without gradients, on `device` (None: the CPU)."""
    if isinstance(settings, dict):
        settings = TeacherSettings(**settings)
    teacher = CrossEncoderTeacher(settings) if teacher_kind(settings) == "cross_encoder" else BiEncoderTeacher(settings)
    return teacher.to(device) if device is not None else teacher
