"""`TextEncoder`: a Hugging Face transformer plus pooling (and optional L2 normalisation) as one module.

The same object is trained (its `forward` takes tokenised features), used for evaluation (`encode`)
and exported as a sentence-transformers folder (`save`) that `SentenceTransformer(path)` loads and
encodes identically. It reads that layout back (`TextEncoder.load`) as well as plain Hugging Face
folders, hub ids and `pkg://` models.

Settings precedence: an explicit constructor argument (anything not `None`) wins; otherwise the value
stored in a sentence-transformers folder is used; otherwise the defaults (`pooling="mean"`, or `"last"`
for decoder backbones, see `codiemb_pl.model.decoder`,
`normalize=True`, `max_seq_length = min(tokenizer.model_max_length, max_position_embeddings, 512)`,
no prompts, prompts included in pooling).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from codiemb_pl.errors import InputError
from codiemb_pl.model.decoder import is_decoder_backbone, prepare_tokenizer
from codiemb_pl.model.lora import merged_weights
from codiemb_pl.model.pooling import (
    POOLING_MODES,
    check_pooling_mode,
    leading_special_tokens,
    pool,
    prefix_pooling_mask,
    prefix_token_count,
)
from codiemb_pl.model.text_bound import bound_for_tokenizer
from codiemb_pl.paths import resolve_location
from codiemb_pl.storage.atomic import atomic_directory
from codiemb_pl.storage.weight_checks import check_finite_state, check_model_folder, weights_location

#: Feature keys passed on to the transformer; anything else in `features` is ignored by the model.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: Optional feature: a 0/1 mask `[b, t]` choosing which tokens are pooled (default: the attention mask).
POOLING_MASK_KEY = "pooling_mask"
DEFAULT_MAX_SEQ_LENGTH = 512
DEVICE_BATCHES_PER_COPY = 32  # encode(): batches kept on the accelerator before one copy to the CPU

_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Our pooling names <-> sentence-transformers' Pooling flags and (v5+) `pooling_mode` names.
_ST_FLAG_TO_MODE = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODE_TO_OURS = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_OURS_TO_ST_MODE = {ours: st for st, ours in _ST_MODE_TO_OURS.items()}
_ST_MODULE_CLASS = "sentence_transformers.models.{}"  # legacy names: every sentence-transformers version reads them
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class _ModelSource:
    """Where the transformer lives: a local folder or a hub id, plus a subfolder (old ST layouts)."""

    location: str
    is_local: bool
    subfolder: str = ""

    @property
    def folder(self) -> Path:
        return Path(self.location) / self.subfolder

    @property
    def hf_kwargs(self) -> dict[str, Any]:
        return {"subfolder": self.subfolder} if self.subfolder and not self.is_local else {}

    @property
    def hf_location(self) -> str:
        return str(self.folder) if self.is_local else self.location


@dataclass
class _SentenceTransformersSettings:
    """What a sentence-transformers folder says about pooling, normalisation, length and prompts."""

    transformer_subfolder: str = ""
    pooling_modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


class TextEncoder(nn.Module):
    """Transformer + pooling (`mean` | `cls` | `last`) + optional L2 normalisation.

    `forward(features)` returns `[b, d]` embeddings (normalised when `normalize`); the module starts in
    eval mode, like a freshly loaded Hugging Face model (Lightning switches it to train mode).
    `state_dict()` holds the transformer's parameters under the `model.` prefix.
    """

    def __init__(self, model_name_or_path: str, pooling: str | None = None, normalize: bool | None = None,
                 max_seq_length: int | None = None, prompts: dict[str, str] | None = None,
                 trust_remote_code: bool = False, dtype: str | None = None, include_prompt: bool | None = None):
        """Load `model_name_or_path` (folder, hub id or `pkg://...`); `None` settings come from the folder.

        `dtype`: `None` loads float32 (safe for training), `"auto"` keeps the checkpoint's dtype, or one of
        `float32|float16|bfloat16`. `include_prompt=False` excludes prompt tokens from pooling in `encode`
        (they are still attended to), as sentence-transformers' `Pooling(include_prompt=False)` does.
        """
        super().__init__()
        if pooling is not None:
            check_pooling_mode(pooling, where="TextEncoder(pooling=...)")
        torch_dtype = _resolve_dtype(dtype)
        source = _locate(resolve_location(str(model_name_or_path)))
        settings = _read_sentence_transformers_settings(source)
        if settings is not None:
            source.subfolder = settings.transformer_subfolder
        _check_has_model_config(source)

        self.name_or_path = source.location
        self.pooling: str = pooling if pooling is not None else _pooling_from_settings(settings, source)
        self.normalize: bool = normalize if normalize is not None else (settings.normalize if settings else True)
        self.include_prompt: bool = include_prompt if include_prompt is not None else (
            settings.include_prompt if settings else True)
        self.prompts: dict[str, str] = _check_prompts(prompts) if prompts is not None else (
            dict(settings.prompts) if settings else {})
        self.default_prompt_name: str | None = settings.default_prompt_name if settings and prompts is None else None
        self.do_lower_case: bool = settings.do_lower_case if settings else False

        self.model: PreTrainedModel = _load_transformer(source, trust_remote_code, torch_dtype)
        check_finite_state(self.model.state_dict(),   # NaN / inf weights: one line naming the file and tensor
                           weights_location(source.folder) if source.is_local else source.location)
        self.tokenizer = _load_tokenizer(source, trust_remote_code, self.model.config)
        if pooling is None and settings is None and is_decoder_backbone(self.model.config):
            self.pooling = "last"  # a causal model's appended EOS is the one token that has seen the whole text
        config = self.model.config
        self.embedding_dim: int = _config_value(config, ("hidden_size", "d_model", "n_embd", "dim")) or \
            self.model.get_input_embeddings().embedding_dim
        self.num_layers: int = _config_value(config, ("num_hidden_layers", "num_layers", "n_layer", "n_layers"))
        if not self.num_layers:
            raise InputError(source.location, "cannot tell the number of layers from config.json",
                             "use a model whose config has num_hidden_layers")
        position_limit = _config_value(config, ("max_position_embeddings", "n_positions"))
        stored_length = settings.max_seq_length if settings else None
        requested_length = max_seq_length if max_seq_length is not None else stored_length
        self.max_seq_length: int = _check_max_seq_length(requested_length, self.tokenizer, position_limit)
        self.eval()

    # ----------------------------------------------------------------------------------------------
    # Training-side API

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenise with padding to the longest text in the batch and truncation to `max_length`
        (default `self.max_seq_length`); texts beyond `model.text_bound.char_bound(max_length)` characters are cut
        first, to a piece that gives the same ids."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.do_lower_case:
            texts = [text.lower() for text in texts]
        max_length = max_length or self.max_seq_length
        texts = bound_for_tokenizer(self.tokenizer, texts, max_length)
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", max_length=max_length)
        return dict(encoded)

    def forward(self, features: dict[str, Tensor], return_middle: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embed a tokenised batch: `[b, d]`, or `(final, middle)` with `return_middle`.

        Mean pooling uses `features["pooling_mask"]` when present (instruction tokens left out), else the
        attention mask; `cls` and `last` take a position that a leading prefix does not move, from the
        attention mask (as sentence-transformers' `include_prompt=True` does). `middle` is the
        same pooling applied to `hidden_states[num_layers // 2]` (index 0 is the embedding layer), always
        L2-normalised (it feeds MidNCE, SPEC §4).
        """
        model_inputs = {key: features[key] for key in MODEL_INPUT_KEYS if key in features}
        outputs = self.model(**model_inputs, output_hidden_states=return_middle, return_dict=True)
        token_states = outputs.last_hidden_state
        mask = features.get(POOLING_MASK_KEY) if self.pooling == "mean" else None
        mask = mask if mask is not None else features.get("attention_mask")
        if mask is None:
            mask = torch.ones(token_states.shape[:2], dtype=torch.long, device=token_states.device)
        final = pool(token_states, mask, self.pooling)
        if self.normalize:
            final = F.normalize(final, p=2, dim=-1)
        if not return_middle:
            return final
        middle = F.normalize(pool(outputs.hidden_states[self.num_layers // 2], mask, self.pooling), p=2, dim=-1)
        return final, middle

    # ----------------------------------------------------------------------------------------------
    # Inference

    def encode(self, texts: list[str], batch_size: int = 64, prompt: str | None = None,
               prompt_name: str | None = None, show_progress: bool = False,
               convert_to_numpy: bool = False, prefix: str | None = None) -> Tensor | np.ndarray:
        """Embed `texts` in input order as a float32 CPU tensor `[n, d]` (numpy with `convert_to_numpy`).

        Runs in eval mode without gradients (the previous mode is restored), batching texts sorted by
        length so each batch pads little. `prompt` (literal text) or `prompt_name` (a key of
        `self.prompts`) is prepended to every text; with neither, `default_prompt_name` applies if set.
        `prefix` (an instruction prefix, instead of a prompt) is prepended too. When `include_prompt` is
        False, their tokens and the leading special tokens (`[CLS]`) are attended to but left out of
        pooling (`model.pooling.prefix_pooling_mask`): sentence-transformers' rule for prompts, and the
        rule training and validation apply to instruction prefixes (so evaluation scores what validation
        scored, and an exported instruction prompt reproduces the training embedding).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if batch_size < 1:
            raise InputError("TextEncoder.encode", f"batch_size must be >= 1, got {batch_size}",
                             "pass a positive batch size")
        if prefix and (prompt is not None or prompt_name is not None):
            raise InputError("TextEncoder.encode", "both prefix and a prompt were given", "pass only one of them")
        lead = prefix if prefix else self._resolve_prompt(prompt, prompt_name)
        if lead:
            texts = [lead + text for text in texts]
        excluded = "" if self.include_prompt else lead
        prefix_tokens = prefix_token_count(self.tokenizer, excluded.lower() if self.do_lower_case else excluded)
        leading = leading_special_tokens(self.tokenizer) if prefix_tokens else 0

        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        batch_starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            batch_starts = tqdm(batch_starts, desc="encode", unit="batch")
        was_training = self.training
        self.eval()
        chunks: list[Tensor] = []
        on_device: list[Tensor] = []  # copied to the CPU in groups, so tokenising overlaps GPU work
        try:
            with torch.inference_mode():  # as sentence-transformers: no autograd bookkeeping at all
                for start in batch_starts:
                    features = self.tokenize([texts[index] for index in order[start:start + batch_size]])
                    features = {key: value.to(self.device) for key, value in features.items()}
                    if prefix_tokens:
                        features[POOLING_MASK_KEY] = prefix_pooling_mask(
                            features["attention_mask"], [prefix_tokens] * len(features["attention_mask"]), leading)
                    on_device.append(self(features).float())
                    if len(on_device) == DEVICE_BATCHES_PER_COPY:
                        chunks.append(torch.cat(on_device).cpu())
                        on_device = []
                if on_device:
                    chunks.append(torch.cat(on_device).cpu())
        finally:
            self.train(was_training)

        embeddings = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        if chunks:
            embeddings[torch.tensor(order, dtype=torch.long)] = torch.cat(chunks)
        return embeddings.numpy() if convert_to_numpy else embeddings

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise InputError("TextEncoder.encode", "both prompt and prompt_name were given", "pass only one of them")
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none configured"
            raise InputError("TextEncoder.encode", f"unknown prompt_name {name!r}", f"use one of: {known}")
        return self.prompts[name]

    # ----------------------------------------------------------------------------------------------
    # Export / import

    def save(self, path: str | Path, model_card: str | None = None) -> None:
        """Write a sentence-transformers folder atomically (call it on one process only).

        Layout: config.json, model.safetensors (no pooler weights) and tokenizer files at the root;
        modules.json (Transformer, Pooling in 1_Pooling, Normalize in 2_Normalize when normalising);
        1_Pooling/config.json; sentence_bert_config.json; config_sentence_transformers.json; README.md
        when `model_card` is given. Weights holding NaN or inf are refused (one `InputError` naming the
        tensor; nothing is written). For a model class with an optional pooler (BERT-style
        `add_pooling_layer`), sentence_bert_config.json carries `model_args: {add_pooling_layer: false}`,
        so sentence-transformers builds the model without the pooler it never uses and loads silently
        (no "pooler.dense.* MISSING ... newly initialized" report), as `TextEncoder` does.
        """
        with atomic_directory(path) as folder:
            model, weights = merged_weights(self.model)  # LoRA adapters merged into the base weights
            weights = {key: value for key, value in weights.items() if not key.startswith("pooler.")}
            check_finite_state(weights, str(path))   # NaN / inf (diverged or damaged): refused, never repaired
            with _quiet_transformers():  # no "Writing model shards" progress bar in the middle of a run
                model.save_pretrained(folder, state_dict=weights)
            self.tokenizer.save_pretrained(folder)
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": _ST_MODULE_CLASS.format("Transformer")},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULE_CLASS.format("Pooling")},
            ]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": _ST_MODULE_CLASS.format("Normalize")})
                (folder / "2_Normalize").mkdir()
            _write_json(folder / "modules.json", modules)
            _write_json(folder / "1_Pooling" / "config.json", self._pooling_config())
            transformer_config: dict[str, Any] = {"max_seq_length": self.max_seq_length,
                                                  "do_lower_case": self.do_lower_case}
            if "add_pooling_layer" in inspect.signature(type(model).__init__).parameters:
                transformer_config["model_args"] = {"add_pooling_layer": False}
            _write_json(folder / "sentence_bert_config.json", transformer_config)
            _write_json(folder / "config_sentence_transformers.json", {
                "model_type": "SentenceTransformer",
                "__version__": _library_versions(),
                "prompts": dict(self.prompts),
                "default_prompt_name": self.default_prompt_name,
                "similarity_fn_name": "cosine",
            })
            if model_card:
                (folder / "README.md").write_text(model_card, encoding="utf-8")
            for written in folder.rglob("*"):  # some writers leave private (0600) files; exports are shared
                written.chmod(0o755 if written.is_dir() else 0o644)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TextEncoder:
        """Read a folder written by `save` (or any sentence-transformers / Hugging Face folder);
        keyword `overrides` take precedence over the stored settings."""
        return cls(str(path), **overrides)

    def _pooling_config(self) -> dict[str, Any]:
        """sentence-transformers' Pooling config with the legacy `pooling_mode_*` flags every version reads."""
        active_mode = _OURS_TO_ST_MODE[self.pooling]
        config: dict[str, Any] = {"word_embedding_dimension": self.embedding_dim}
        config.update({flag: mode == active_mode for flag, mode in _ST_FLAG_TO_MODE.items()})
        config["include_prompt"] = self.include_prompt
        return config


# --------------------------------------------------------------------------------------------------
# Helpers: locating and loading


def _locate(location: str) -> _ModelSource:
    """Classify `location` as a local folder or a hub id; anything else is an `InputError`."""
    path = Path(location).expanduser()
    if path.is_dir():
        return _ModelSource(str(path), is_local=True)
    if path.exists():
        raise InputError(location, "is a file, not a model folder", "point to the folder that holds config.json")
    if _HUB_ID_PATTERN.match(location) and not location.startswith((".", "~")):
        return _ModelSource(location, is_local=False)
    raise InputError(location, "no such model folder",
                     "check the path, or give a hub id like 'org/name' or pkg://module")


def _check_has_model_config(source: _ModelSource) -> None:
    if source.is_local and not (source.folder / "config.json").is_file():
        raise InputError(str(source.folder), "folder has no config.json, so it is not a Hugging Face model",
                         "point to a model folder (config.json + weights) or a sentence-transformers export")


def _resolve_dtype(dtype: str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if dtype not in _DTYPES:
        raise InputError("TextEncoder(dtype=...)", f"unknown dtype {dtype!r}", f"use one of: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _model_class_accepts(config: PretrainedConfig, source: _ModelSource, trust_remote_code: bool,
                         argument: str) -> bool:
    """Whether the class AutoModel would build for `config` takes `argument` in its constructor."""
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        model_class = None
        auto_map = getattr(config, "auto_map", None) or {}
        if trust_remote_code and "AutoModel" in auto_map:
            try:
                from transformers.dynamic_module_utils import get_class_from_dynamic_module

                model_class = get_class_from_dynamic_module(auto_map["AutoModel"], source.hf_location,
                                                            **source.hf_kwargs)
            except Exception:  # unknown remote code layout: simply load without the argument
                model_class = None
    if model_class is None:
        return False
    return argument in inspect.signature(model_class.__init__).parameters


@contextmanager
def _quiet_transformers():
    """Lower transformers' log level to errors and hide its progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _load_transformer(source: _ModelSource, trust_remote_code: bool, dtype: torch.dtype | str) -> PreTrainedModel:
    """AutoModel without the unused BERT-style pooler (DDP would flag its parameters as unused). A local
    folder's config.json and weight files are checked first (`weight_checks.check_model_folder`)."""
    from safetensors import SafetensorError

    if source.is_local:
        check_model_folder(source.folder)
    try:
        config = AutoConfig.from_pretrained(source.hf_location, trust_remote_code=trust_remote_code, **source.hf_kwargs)
        extra: dict[str, Any] = {}
        if _model_class_accepts(config, source, trust_remote_code, "add_pooling_layer"):
            extra["add_pooling_layer"] = False
        with _quiet_transformers():  # the load report would list the pooler we drop on purpose
            return AutoModel.from_pretrained(source.hf_location, config=config, dtype=dtype,
                                             trust_remote_code=trust_remote_code, **source.hf_kwargs, **extra)
    except OSError as exc:
        raise InputError(source.location, f"could not load the model ({exc})",
                         "give a local folder, pkg://module, or a hub id that is cached (HF_HUB_OFFLINE=1) "
                         "or reachable") from exc
    except SafetensorError as exc:   # a hub download the folder checks did not see
        raise InputError(source.location, f"could not read the model's weights ({exc})",
                         "re-download the model; a damaged file is not repaired") from exc


def _load_tokenizer(source: _ModelSource, trust_remote_code: bool, config: PretrainedConfig | None = None):
    """AutoTokenizer prepared for the backbone (`decoder.prepare_tokenizer`): without a pad token it pads
    with EOS; a decoder's tokenizer pads on the left and appends EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.hf_location, trust_remote_code=trust_remote_code,
                                                  **source.hf_kwargs)
    except OSError as exc:
        raise InputError(source.location, f"could not load the tokenizer ({exc})",
                         "save the tokenizer files next to config.json") from exc
    return prepare_tokenizer(tokenizer, config, where=source.location)


def _config_value(config: PretrainedConfig, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_max_seq_length(requested: int | None, tokenizer, position_limit: int | None) -> int:
    """`requested`, or `min(tokenizer.model_max_length, max_position_embeddings, 512)` when `None`."""
    limits = [DEFAULT_MAX_SEQ_LENGTH, tokenizer.model_max_length] + ([position_limit] if position_limit else [])
    if requested is None:
        return int(min(limit for limit in limits if isinstance(limit, int) and limit > 0))
    if not isinstance(requested, int) or requested < 1:
        raise InputError("TextEncoder(max_seq_length=...)", f"must be a positive integer, got {requested!r}",
                         "pass e.g. 256, or None for the model's limit")
    if position_limit and requested > position_limit:
        raise InputError("TextEncoder(max_seq_length=...)",
                         f"{requested} exceeds the model's {position_limit} position embeddings",
                         f"use at most {position_limit}")
    return requested


def _check_prompts(prompts: dict[str, str]) -> dict[str, str]:
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise InputError("TextEncoder(prompts=...)", "prompts must map names to prompt strings",
                         'pass e.g. {"query": "query: ", "passage": ""}')
    return dict(prompts)


# --------------------------------------------------------------------------------------------------
# Helpers: the sentence-transformers layout


def _read_json(source: _ModelSource, relative_path: str) -> Any | None:
    """JSON content of `relative_path` in the folder or hub repo, or `None` when the file is absent."""
    if source.is_local:
        file_path = Path(source.location) / relative_path
        if not file_path.is_file():
            return None
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(source.location, relative_path, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except Exception:  # unreachable or gated repo: treat as "not a sentence-transformers repo"
            found = None
        if found is None:
            return None
        file_path = Path(found)
    try:
        return json.loads(file_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(str(file_path), f"is not valid JSON ({exc})", "repair or re-export the model folder") from exc


def _read_sentence_transformers_settings(source: _ModelSource) -> _SentenceTransformersSettings | None:
    """Parse modules.json and the module configs; `None` when the location is not a sentence-transformers model."""
    modules = _read_json(source, "modules.json")
    if modules is None:
        return None
    settings = _SentenceTransformersSettings()
    pooling_path = None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            settings.transformer_subfolder = module.get("path", "") or ""
        elif kind == "Pooling":
            pooling_path = module.get("path", "")
        elif kind == "Normalize":
            settings.normalize = True
        else:
            raise InputError(f"{source.location}/modules.json", f"module type {module.get('type')!r} is not supported",
                             "TextEncoder handles Transformer, Pooling and Normalize only; load the bare transformer "
                             "folder instead if dropping that module is intended")
    if pooling_path is not None:
        pooling_config = _read_json(source, f"{pooling_path}/config.json" if pooling_path else "config.json") or {}
        settings.pooling_modes = _st_pooling_modes(pooling_config)
        settings.include_prompt = bool(pooling_config.get("include_prompt", True))
    subfolder = settings.transformer_subfolder
    transformer_config = _read_json(source, f"{subfolder}/sentence_bert_config.json" if subfolder
                                    else "sentence_bert_config.json") or {}
    settings.max_seq_length = transformer_config.get("max_seq_length")
    settings.do_lower_case = bool(transformer_config.get("do_lower_case", False))
    model_config = _read_json(source, "config_sentence_transformers.json") or {}
    settings.prompts = {str(k): str(v or "") for k, v in (model_config.get("prompts") or {}).items()}
    settings.default_prompt_name = model_config.get("default_prompt_name")
    return settings


def _st_pooling_modes(pooling_config: dict[str, Any]) -> tuple[str, ...]:
    """Pooling modes from either the v5+ `pooling_mode` key or the legacy `pooling_mode_*` flags."""
    if "pooling_mode" in pooling_config:
        modes = pooling_config["pooling_mode"]
        return (modes,) if isinstance(modes, str) else tuple(modes)
    active = tuple(mode for flag, mode in _ST_FLAG_TO_MODE.items() if pooling_config.get(flag))
    return active or ("mean",)


def _pooling_from_settings(settings: _SentenceTransformersSettings | None, source: _ModelSource) -> str:
    if settings is None:
        return "mean"
    modes = settings.pooling_modes
    if len(modes) == 1 and modes[0] in _ST_MODE_TO_OURS:
        return _ST_MODE_TO_OURS[modes[0]]
    raise InputError(f"{source.location}/1_Pooling/config.json", f"pooling {'+'.join(modes)} is not supported",
                     f"pass pooling= one of {', '.join(POOLING_MODES)} to override it")


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _library_versions() -> dict[str, str]:
    import transformers

    versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:
        versions = {"sentence_transformers": importlib.metadata.version("sentence-transformers"), **versions}
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions
