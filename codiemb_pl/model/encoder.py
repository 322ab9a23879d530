"""`TextEncoder`: a Hugging Face transformer plus pooling (and optional L2 normalisation) as one module.

The same object is trained (its `forward` takes tokenised features), used for evaluation (`encode`)
and exported as a sentence-transformers folder (`save`) that `SentenceTransformer(path)` loads and
encodes identically. It reads that layout back (`TextEncoder.load`) as well as plain Hugging Face
folders, hub ids and `pkg://` models: the folder's settings through `model.st_folder`, the transformer
and tokenizer through `model.hf_loading`.

Settings precedence: an explicit constructor argument (anything not `None`) wins; otherwise the value
stored in a sentence-transformers folder is used; otherwise the defaults (`pooling="mean"`, or `"last"`
for decoder backbones, see `codiemb_pl.model.decoder`,
`normalize=True`, `max_seq_length = min(tokenizer.model_max_length, max_position_embeddings, 512)`,
no prompts, prompts included in pooling).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from codiemb_pl.errors import InputError
from codiemb_pl.model.compiling import call_compiled
from codiemb_pl.model.decoder import is_decoder_backbone
from codiemb_pl.model.hf_loading import (
    check_has_model_config,
    load_tokenizer,
    load_transformer,
    locate_model,
    quiet_transformers,
    resolve_dtype,
)
from codiemb_pl.model.layers import select_layers
from codiemb_pl.model.lora import base_model_of, merged_weights
from codiemb_pl.model.packing import FLASH_IMPLEMENTATIONS, PACKABLE_MODEL_TYPES, pack_features
from codiemb_pl.model.pooling import (
    POOLING_MODES,
    check_pooling_mode,
    leading_special_tokens,
    pool,
    prefix_pooling_mask,
    prefix_token_count,
)
from codiemb_pl.model.st_folder import ST_POOLING_FLAGS, SentenceTransformersSettings, read_settings
from codiemb_pl.model.text_bound import bound_for_tokenizer
from codiemb_pl.model.widths import RECORD_KEY as MATRYOSHKA_RECORD_KEY
from codiemb_pl.paths import resolve_location
from codiemb_pl.storage.atomic import atomic_directory
from codiemb_pl.storage.weight_checks import check_finite_state, weights_location

#: Feature keys passed on to the transformer; anything else in `features` is ignored by the model.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: Optional feature: a 0/1 mask `[b, t]` choosing which tokens are pooled (default: the attention mask).
POOLING_MASK_KEY = "pooling_mask"
DEFAULT_MAX_SEQ_LENGTH = 512
DEVICE_BATCHES_PER_COPY = 32  # encode(): batches kept on the accelerator before one copy to the CPU

# sentence-transformers' pooling modes (`model.st_folder`) <-> our pooling names.
_ST_MODE_TO_OURS = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_OURS_TO_ST_MODE = {ours: st for st, ours in _ST_MODE_TO_OURS.items()}
_ST_MODULE_CLASS = "sentence_transformers.models.{}"  # legacy names: every sentence-transformers version reads them


class TextEncoder(nn.Module):
    """Transformer + pooling (`mean` | `cls` | `last`) + optional L2 normalisation.

    `forward(features)` returns `[b, d]` embeddings (normalised when `normalize`); the module starts in
    eval mode, like a freshly loaded Hugging Face model (Lightning switches it to train mode).
    `state_dict()` holds the transformer's parameters under the `model.` prefix.
    """

    def __init__(self, model_name_or_path: str, pooling: str | None = None, normalize: bool | None = None,
                 max_seq_length: int | None = None, prompts: dict[str, str] | None = None,
                 trust_remote_code: bool = False, dtype: str | None = None, include_prompt: bool | None = None,
                 num_layers: int | list[int] | None = None):
        """Load `model_name_or_path` (folder, hub id or `pkg://...`); `None` settings come from the folder.

        `dtype`: `None` loads float32 (safe for training), `"auto"` keeps the checkpoint's dtype, or one of
        `float32|float16|bfloat16`. `include_prompt=False` excludes prompt tokens from pooling in `encode`
        (they are still attended to), as sentence-transformers' `Pooling(include_prompt=False)` does.
        `num_layers`: keep the first k transformer blocks, or the blocks at a list of indices
        (`model.layers.select_layers`; `kept_layers` records the original indices, None when all are kept).
        """
        super().__init__()
        if pooling is not None:
            check_pooling_mode(pooling, where="TextEncoder(pooling=...)")
        torch_dtype = resolve_dtype(dtype)
        source = locate_model(resolve_location(str(model_name_or_path)))
        settings = read_settings(source.location, source.is_local)
        if settings is not None:
            _check_supported_modules(settings, source.location)
            source.subfolder = settings.transformer_subfolder
        check_has_model_config(source)

        self.name_or_path = source.location
        self.pooling: str = pooling if pooling is not None else _pooling_from_settings(settings, source.location)
        self.normalize: bool = normalize if normalize is not None else (settings.normalize if settings else True)
        self.include_prompt: bool = include_prompt if include_prompt is not None else (
            settings.include_prompt if settings else True)
        self.prompts: dict[str, str] = _check_prompts(prompts) if prompts is not None else (
            dict(settings.prompts) if settings else {})
        self.default_prompt_name: str | None = settings.default_prompt_name if settings and prompts is None else None
        self.do_lower_case: bool = settings.do_lower_case if settings else False
        # the Matryoshka widths the weights were trained at (`model.widths`): recorded by `save`, read back here
        self.matryoshka_dims: list[int] = list(settings.matryoshka_dims) if settings else []

        self.model: PreTrainedModel = load_transformer(source, trust_remote_code, torch_dtype)
        check_finite_state(self.model.state_dict(),   # NaN / inf weights: one line naming the file and tensor
                           weights_location(source.folder) if source.is_local else source.location)
        self.kept_layers: list[int] | None = None if num_layers is None else select_layers(self.model, num_layers)
        self.tokenizer = load_tokenizer(source, trust_remote_code, self.model.config)
        self.causal_backbone: bool = is_decoder_backbone(self.model.config)
        if pooling is None and settings is None and self.causal_backbone:
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
        outputs = call_compiled(self.model, {**model_inputs, "output_hidden_states": return_middle,
                                             "return_dict": True})
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
    # Padding-free forward (`model.packing`)

    @property
    def attention_implementation(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", None) or "eager")

    @property
    def packs_varlen(self) -> bool:
        """Packed rows go to flash-attention's varlen kernels (one row, no mask) rather than a dense mask."""
        return self.attention_implementation in FLASH_IMPLEMENTATIONS

    def can_pack(self) -> bool:
        """Whether this backbone takes packed rows (`PACKABLE_MODEL_TYPES`, attention sdpa / eager / flash)."""
        return getattr(self.model.config, "model_type", None) in PACKABLE_MODEL_TYPES and \
            self.attention_implementation in ("sdpa", "eager", *FLASH_IMPLEMENTATIONS)

    def use_flash_attention(self) -> bool:
        """Switch the backbone to `flash_attention_2` (packed rows then run varlen, one row, no mask) when on CUDA,
        flash-attn is installed and the model class supports it; False (nothing changed) otherwise. Flash kernels
        need half precision: call it only when training runs in bf16 / fp16."""
        if self.device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            return False
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            base.set_attn_implementation("flash_attention_2")
        except (ValueError, ImportError, NotImplementedError):
            return False
        return self.attention_implementation in FLASH_IMPLEMENTATIONS

    def forward_packed(self, groups: list[dict[str, Tensor]], return_middle: bool = False
                       ) -> list[Tensor | tuple[Tensor, Tensor]]:
        """`[self(group) for group in groups]` as one padding-free forward (`model.packing.pack_features`): the
        same embeddings up to rounding, no FLOP spent on padding, one transformer call for every group."""
        eager = self.attention_implementation == "eager"
        packed = pack_features(groups, self.tokenizer.pad_token_id or 0, causal=self.causal_backbone,
                               varlen=self.packs_varlen, mask_dtype=self.model.dtype if eager else None)
        outputs = call_compiled(self.model, {**packed.inputs, "output_hidden_states": return_middle,
                                             "return_dict": True})
        final = packed.pool(outputs.last_hidden_state, self.pooling)
        if self.normalize:
            final = F.normalize(final, p=2, dim=-1)
        middle = None
        if return_middle:
            middle = F.normalize(packed.pool(outputs.hidden_states[self.num_layers // 2], self.pooling), p=2, dim=-1)
        results: list[Tensor | tuple[Tensor, Tensor]] = []
        start = 0
        for group in groups:
            rows = slice(start, start + group["attention_mask"].shape[0])
            start = rows.stop
            results.append(final[rows] if middle is None else (final[rows], middle[rows]))
        return results

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

    def save(self, path: str | Path, model_card: str | None = None,
             weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write a sentence-transformers folder atomically (call it on one process only).

        Layout: config.json, model.safetensors (no pooler weights) and tokenizer files at the root;
        modules.json (Transformer, Pooling in 1_Pooling, Normalize in 2_Normalize when normalising);
        1_Pooling/config.json; sentence_bert_config.json; config_sentence_transformers.json; README.md
        when `model_card` is given; `matryoshka_dims` (when set) is recorded in config_sentence_transformers.json
        (`model.widths`). Weights holding NaN or inf are refused (one `InputError` naming the
        tensor; nothing is written). For a model class with an optional pooler (BERT-style
        `add_pooling_layer`), sentence_bert_config.json carries `model_args: {add_pooling_layer: false}`,
        so sentence-transformers builds the model without the pooler it never uses and loads silently
        (no "pooler.dense.* MISSING ... newly initialized" report), as `TextEncoder` does. `weights`: the
        transformer weights to write under the base model's names (default: the model's own, LoRA merged in).
        """
        with atomic_directory(path) as folder:
            if weights is None:
                model, weights = merged_weights(self.model)  # LoRA adapters merged into the base weights
            else:
                model = base_model_of(self.model)
            weights = {key: value for key, value in weights.items() if not key.startswith("pooler.")}
            check_finite_state(weights, str(path))   # NaN / inf (diverged or damaged): refused, never repaired
            with quiet_transformers():  # no "Writing model shards" progress bar in the middle of a run
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
                **({MATRYOSHKA_RECORD_KEY: list(self.matryoshka_dims)} if self.matryoshka_dims else {}),
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
        config.update({flag: mode == active_mode for flag, mode in ST_POOLING_FLAGS.items()})
        config["include_prompt"] = self.include_prompt
        return config


# --------------------------------------------------------------------------------------------------
# Helpers


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


def _check_supported_modules(settings: SentenceTransformersSettings, location: str) -> None:
    """A sentence-transformers folder whose modules are more than Transformer, Pooling and Normalize is refused."""
    if settings.other_module_types:
        raise InputError(f"{location}/modules.json", f"module type {settings.other_module_types[0]!r} is not supported",
                         "TextEncoder handles Transformer, Pooling and Normalize only; load the bare transformer "
                         "folder instead if dropping that module is intended")


def _pooling_from_settings(settings: SentenceTransformersSettings | None, location: str) -> str:
    """Our pooling name for the folder's single supported pooling mode (mean without a sentence-transformers folder)."""
    if settings is None:
        return "mean"
    modes = settings.pooling_modes
    if len(modes) == 1 and modes[0] in _ST_MODE_TO_OURS:
        return _ST_MODE_TO_OURS[modes[0]]
    raise InputError(f"{location}/1_Pooling/config.json", f"pooling {'+'.join(modes)} is not supported",
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