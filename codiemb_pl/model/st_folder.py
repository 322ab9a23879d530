"""A sentence-transformers / Hugging Face model folder's JSON files, read here and only here.

One reader, `read_json_file(path)`: the content, None when the file is absent, and for a file that is not
UTF-8 JSON one line, `<file>: is not valid JSON (<reason>) (repair or re-export the model folder)`. On it:

    read_model_json(location, relative_path, is_local)  a file of a folder or of a hub repo (from the local
                                                         Hugging Face cache; transformers is imported only then)
    read_modules(location, is_local)    modules.json's list of modules; None when absent (not a s-t folder)
    transformer_folder(folder)          the folder holding the transformer (modules.json's Transformer path)
    read_settings(location, is_local)   what the folder declares (modules.json, the Pooling module's config.json,
                                        sentence_bert_config.json, config_sentence_transformers.json);
                                        None for a plain Hugging Face folder
    folder_trained_dims(folder)         the Matryoshka widths config_sentence_transformers.json records

`TextEncoder` (its settings), `prompts.folder_prompt_settings` (the prompt part of them) and `fusion.sources`
(a checkpoint's config.json and transformer folder) all read through these. Names are sentence-transformers'
own: pooling modes `mean`, `cls`, `lasttoken`, ... (`pooling_modes`); `TextEncoder` maps them to its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb_pl.errors import InputError
from codiemb_pl.model.widths import trained_dims_of

REPAIR = "repair or re-export the model folder"
#: sentence-transformers' legacy Pooling flags (every version reads them) and the pooling mode each one turns on.
ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass
class SentenceTransformersSettings:
    """What a sentence-transformers folder says about pooling, normalisation, length and prompts.

    `other_module_types`: the `type` of every module besides Transformer, Pooling and Normalize (e.g. Dense),
    which `TextEncoder` does not reproduce."""

    transformer_subfolder: str = ""
    pooling_modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    other_module_types: tuple[Any, ...] = ()
    matryoshka_dims: list[int] = field(default_factory=list)   # the trained widths (`model.widths`)


def read_json_file(path: str | Path) -> Any | None:
    """JSON content of `path`, None when absent; a file that is not UTF-8 JSON is one InputError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(str(path), f"is not valid JSON ({error})", REPAIR) from error


def read_model_json(location: str | Path, relative_path: str, is_local: bool = True) -> Any | None:
    """`relative_path` of a local folder, or of hub repo `location` as found in the Hugging Face cache (an
    unreachable or gated repo reads as absent), through `read_json_file`."""
    if is_local:
        return read_json_file(Path(location) / relative_path)
    try:
        from transformers.utils import cached_file

        found = cached_file(str(location), relative_path, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # unreachable or gated repo: treat as "not a sentence-transformers repo"
        found = None
    return None if found is None else read_json_file(found)


def read_modules(location: str | Path, is_local: bool = True) -> list[dict[str, Any]] | None:
    """modules.json's modules (`{"type", "path", ...}` each), None without modules.json; anything but a list
    of objects is one InputError."""
    modules = read_model_json(location, "modules.json", is_local)
    if modules is None:
        return None
    if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
        where = Path(location) / "modules.json" if is_local else f"{location}/modules.json"
        raise InputError(str(where), "is not a list of modules", REPAIR)
    return modules


def module_kind(module: dict[str, Any]) -> str:
    """A module's class name: `Pooling` for `sentence_transformers.models.Pooling`."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _module_path(modules: list[dict[str, Any]], kind: str) -> str | None:
    """The folder (relative, "" for the root) of the first module of `kind`; None when there is none."""
    return next(((module.get("path") or "") for module in modules if module_kind(module) == kind), None)


def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformer weights: the root, or modules.json's Transformer path."""
    modules = read_modules(folder)
    return folder / (_module_path(modules, "Transformer") or "") if modules else folder


def read_settings(location: str | Path, is_local: bool = True) -> SentenceTransformersSettings | None:
    """The settings a sentence-transformers folder (or hub repo) declares; None when it has no modules.json."""
    modules = read_modules(location, is_local)
    if modules is None:
        return None
    settings = SentenceTransformersSettings(
        transformer_subfolder=_module_path(modules, "Transformer") or "",
        normalize=any(module_kind(module) == "Normalize" for module in modules),
        other_module_types=tuple(module.get("type") for module in modules
                                 if module_kind(module) not in SUPPORTED_MODULES))
    pooling_path = _module_path(modules, "Pooling")
    if pooling_path is not None:
        pooling = read_model_json(location, f"{pooling_path}/config.json" if pooling_path else "config.json",
                                  is_local) or {}
        settings.pooling_modes = pooling_modes(pooling)
        settings.include_prompt = bool(pooling.get("include_prompt", True))
    subfolder = settings.transformer_subfolder
    transformer = read_model_json(location, f"{subfolder}/sentence_bert_config.json" if subfolder
                                  else "sentence_bert_config.json", is_local) or {}
    settings.max_seq_length = transformer.get("max_seq_length")
    settings.do_lower_case = bool(transformer.get("do_lower_case", False))
    model = read_model_json(location, "config_sentence_transformers.json", is_local) or {}
    settings.prompts = {str(k): str(v or "") for k, v in (model.get("prompts") or {}).items()}
    settings.default_prompt_name = model.get("default_prompt_name")
    settings.matryoshka_dims = trained_dims_of(model, f"{location}/config_sentence_transformers.json")
    return settings


def folder_trained_dims(location: str | Path) -> list[int] | None:
    """The Matryoshka widths a local sentence-transformers folder records (`model.widths`); None: no record."""
    file = Path(location) / "config_sentence_transformers.json"
    return trained_dims_of(read_json_file(file), str(file)) or None


def pooling_modes(pooling_config: dict[str, Any]) -> tuple[str, ...]:
    """Pooling modes from either the v5+ `pooling_mode` key or the legacy `pooling_mode_*` flags (none: mean)."""
    if "pooling_mode" in pooling_config:
        modes = pooling_config["pooling_mode"]
        return (modes,) if isinstance(modes, str) else tuple(modes)
    active = tuple(mode for flag, mode in ST_POOLING_FLAGS.items() if pooling_config.get(flag))
    return active or ("mean",)
