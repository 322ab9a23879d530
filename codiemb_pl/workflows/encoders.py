"""A `TextEncoder` from whatever a user points at: a sentence-transformers or Hugging Face folder, a hub
id, `pkg://...`, or a Lightning checkpoint (`.ckpt`) of `CoDiEmbModule`.

A checkpoint's `encoder.model.*` weights go into the encoder named by its `model_name_or_path`
hyper-parameter (or by `base`), with the checkpoint's pooling, normalisation and length, and prompt
tokens left out of pooling as in training. The checkpoint is read under `checkpoint_loading`'s rule (weights-only unless trusted).

`load_weights(encoder, weights)` is the one way weights go into an existing encoder (fusion scoring and export
in `CheckpointFusion`, sweeps and BOOM, a checkpoint's encoder here, the benchmarks): from a model folder, a
`.safetensors` file, a `.ckpt` or a state dict, LoRA-wrapped encoders included. `transformer_state(model)` is
θ0 named as an export names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.keys import is_untrained_key
from codiemb_pl.fusion.sources import open_checkpoint, read_lightning_checkpoint
from codiemb_pl.model.device import resolve_device
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.lora import is_lora_model, load_merged_weights
from codiemb_pl.storage.weight_checks import check_finite_state

CHECKPOINT_SUFFIX = ".ckpt"


def read_encoder_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(transformer weights with `encoder.model.` stripped, hyper-parameters) of a `CoDiEmbModule` checkpoint."""
    location = Path(path)
    if not location.is_file():
        raise InputError(str(path), "no such checkpoint file", "check the path to the .ckpt")
    return read_lightning_checkpoint(location)   # the reader `codiemb fuse` uses too


def load_checkpoint_encoder(path: str | Path, base: str | None = None,
                            max_seq_length: int | None = None) -> TextEncoder:
    """The encoder of a Lightning checkpoint, built on `base` (default: the checkpoint's base model)."""
    weights, hparams = read_encoder_checkpoint(path)
    architecture = base or hparams.get("model_name_or_path")
    if not architecture:
        raise InputError(str(path), "the checkpoint does not name its base model "
                                    "(hyper_parameters.model_name_or_path)", "pass --base PATH")
    encoder = TextEncoder(architecture, pooling=hparams.get("pooling"), normalize=hparams.get("normalize"),
                          max_seq_length=max_seq_length if max_seq_length is not None else hparams.get("max_seq_length"),
                          include_prompt=False, num_layers=hparams.get("num_layers"))
    check_finite_state(weights, str(path))   # NaN / inf: one line naming the checkpoint and tensor
    load_weights(encoder, weights, where=str(path), fix="pass --base with the model the checkpoint was trained from")
    return encoder


def load_weights(encoder: TextEncoder, weights: str | Path | Mapping[str, torch.Tensor], *, where: str = "",
                 fix: str = "use weights of the same base model") -> None:
    """Put transformer weights (Hugging Face names) into `encoder`: from a model folder, `.safetensors` or `.ckpt`
    (`fusion.sources.open_checkpoint`, under `checkpoint_loading`'s rule) or a state dict. Every trained weight of
    the encoder must be given and fit; untrained ones (the BERT pooler, buffers) are loaded when given, else kept.
    A LoRA-wrapped encoder takes them as its merged weights (`lora.load_merged_weights`: base weights replaced,
    adapters zeroed). One `InputError` (naming `where`, default the location) when they do not fit."""
    if not isinstance(weights, Mapping):
        where = where or str(weights)
        source = open_checkpoint(weights).source
        weights = {key: source.get(key) for key in source.keys()}
    if is_lora_model(encoder.model):
        load_merged_weights(encoder.model, dict(weights))
        return
    try:
        result = encoder.model.load_state_dict(dict(weights), strict=False)
    except RuntimeError as error:   # a shape that does not fit
        raise InputError(where or "weights", f"weights do not fit {encoder.name_or_path} "
                         f"({' '.join(str(error).split())[:300]})", fix) from None
    missing = [key for key in result.missing_keys if not is_untrained_key(key)]
    unexpected = [key for key in result.unexpected_keys if not is_untrained_key(key)]
    if missing or unexpected:
        raise InputError(where or "weights", f"weights do not fit {encoder.name_or_path} (missing {missing[:3]}, "
                                             f"unexpected {unexpected[:3]})", fix)


def transformer_state(model_name_or_path: str) -> dict[str, torch.Tensor]:
    """θ0 named as in an export: the transformer's state dict without pooler weights (`TextEncoder.save`)."""
    state = TextEncoder(str(model_name_or_path)).model.state_dict()
    return {key: value for key, value in state.items() if not key.startswith("pooler.")}


def load_encoder(model: str | Path, base: str | None = None, device: str | torch.device | None = None,
                 max_seq_length: int | None = None) -> TextEncoder:
    """A `TextEncoder` from a model folder / hub id / `pkg://` model, or from a Lightning `.ckpt`.

    `base` (only for a `.ckpt`) names the model whose architecture takes the weights; `device` is a torch
    device or a name (`auto`, `cpu`, `cuda:1`, ... checked by `device.resolve_device`), `None` leaves the
    encoder on the CPU; `max_seq_length` overrides the model's length limit.
    """
    model = str(model)
    if model.endswith(CHECKPOINT_SUFFIX):
        encoder = load_checkpoint_encoder(model, base, max_seq_length)
    else:
        if base is not None:
            raise InputError(f"--base {base}", "only applies to a .ckpt --model", "remove --base")
        encoder = TextEncoder(model, max_seq_length=max_seq_length)
    return on_device(encoder, device)


def on_device(encoder: TextEncoder, device: str | torch.device | None) -> TextEncoder:
    """`encoder` moved to `device` (a torch device, or a name checked by `device.resolve_device`); `None`: as is."""
    if device is None:
        return encoder
    return encoder.to(resolve_device(device) if isinstance(device, str) else device)
