"""Loading a Hugging Face backbone for `TextEncoder`: where it lives, its transformer and its tokenizer.

    locate_model(location) -> ModelSource   a local folder or a hub id (anything else: InputError); a
                                            sentence-transformers folder's transformer may sit in a subfolder
    check_has_model_config(source)          a local folder must hold config.json
    resolve_dtype(name)                     None -> float32; "auto" keeps the checkpoint's dtype
    load_transformer(source, ...)           AutoModel without the unused BERT-style pooler, the folder checked
                                            first (`storage.weight_checks.check_model_folder`)
    load_tokenizer(source, ...)             AutoTokenizer prepared for the backbone (`decoder.prepare_tokenizer`)
    quiet_transformers()                    transformers' logs at error level, no progress bars, for a block

Every failure is one `InputError` naming the location. What a sentence-transformers folder declares (pooling,
prompts, ...) is read by `model.st_folder`.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from codiemb_pl.errors import InputError
from codiemb_pl.model.decoder import prepare_tokenizer
from codiemb_pl.storage.weight_checks import check_model_folder

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
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


def locate_model(location: str) -> ModelSource:
    """Classify `location` as a local folder or a hub id; anything else is an `InputError`."""
    path = Path(location).expanduser()
    if path.is_dir():
        return ModelSource(str(path), is_local=True)
    if path.exists():
        raise InputError(location, "is a file, not a model folder", "point to the folder that holds config.json")
    if HUB_ID_PATTERN.match(location) and not location.startswith((".", "~")):
        return ModelSource(location, is_local=False)
    raise InputError(location, "no such model folder",
                     "check the path, or give a hub id like 'org/name' or pkg://module")


def check_has_model_config(source: ModelSource) -> None:
    """A local model folder (or its transformer subfolder) must hold config.json."""
    if source.is_local and not (source.folder / "config.json").is_file():
        raise InputError(str(source.folder), "folder has no config.json, so it is not a Hugging Face model",
                         "point to a model folder (config.json + weights) or a sentence-transformers export")


def resolve_dtype(dtype: str | None) -> torch.dtype | str:
    """The dtype `from_pretrained` loads in: float32 for None, "auto" keeps the checkpoint's, else a `DTYPES` name."""
    if dtype is None:
        return torch.float32
    if dtype not in DTYPES:
        raise InputError("TextEncoder(dtype=...)", f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _model_class_accepts(config: PretrainedConfig, source: ModelSource, trust_remote_code: bool,
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
def quiet_transformers():
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


def load_transformer(source: ModelSource, trust_remote_code: bool, dtype: torch.dtype | str) -> PreTrainedModel:
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
        with quiet_transformers():  # the load report would list the pooler we drop on purpose
            return AutoModel.from_pretrained(source.hf_location, config=config, dtype=dtype,
                                             trust_remote_code=trust_remote_code, **source.hf_kwargs, **extra)
    except OSError as exc:
        raise InputError(source.location, f"could not load the model ({exc})",
                         "give a local folder, pkg://module, or a hub id that is cached (HF_HUB_OFFLINE=1) "
                         "or reachable") from exc
    except SafetensorError as exc:   # a hub download the folder checks did not see
        raise InputError(source.location, f"could not read the model's weights ({exc})",
                         "re-download the model; a damaged file is not repaired") from exc


def load_tokenizer(source: ModelSource, trust_remote_code: bool, config: PretrainedConfig | None = None):
    """AutoTokenizer prepared for the backbone (`decoder.prepare_tokenizer`): without a pad token it pads
    with EOS; a decoder's tokenizer pads on the left and appends EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.hf_location, trust_remote_code=trust_remote_code,
                                                  **source.hf_kwargs)
    except OSError as exc:
        raise InputError(source.location, f"could not load the tokenizer ({exc})",
                         "save the tokenizer files next to config.json") from exc
    return prepare_tokenizer(tokenizer, config, where=source.location)

