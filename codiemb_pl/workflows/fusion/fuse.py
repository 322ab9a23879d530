"""One merge into a sentence-transformers folder (`fuse`, what `codiemb fuse` does).

Open a base and models (folders, `.safetensors`, `.ckpt`), refuse inputs that do not belong together,
merge them in slices into a folder that keeps the template's pooling, normalisation and the members'
prompts, optionally score it, and write its model card; the folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.compatibility import check_same_architecture, check_shares_base, drop_unshared_untrained_keys
from codiemb_pl.fusion.engine import Merge
from codiemb_pl.fusion.sources import OpenedCheckpoint, open_checkpoint
from codiemb_pl.model.card import build_fused_model_card
from codiemb_pl.model.lora import check_lora_mix
from codiemb_pl.model.prompts import folder_prompt_settings, members_prompt_settings, write_prompt_settings
from codiemb_pl.model.st_folder import folder_trained_dims, read_json_file, transformer_folder
from codiemb_pl.model.widths import RECORD_KEY as WIDTHS_RECORD_KEY
from codiemb_pl.model.widths import members_trained_dims
from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text, remove_stale_temporaries
from codiemb_pl.workflows.fusion.scoring import evaluate_at_trained_widths

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def prior_weights(models: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Per-model `weight`s ([{path, weight}]): None when none is given, 1.0 where one is missing."""
    weights = [model.get("weight") for model in models]
    if all(weight is None for weight in weights):
        return None
    return [1.0 if weight is None else float(weight) for weight in weights]


def _ignore_weights(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(WEIGHT_FILE_SUFFIXES) or n in WEIGHT_INDEX_NAMES or n == "README.md"]


def write_template(base: OpenedCheckpoint, template: str | None, staging: Path) -> Path:
    """Put the non-weight files of the output into `staging`; returns the folder that takes the weights."""
    folder = Path(template or base.model_folder or "")
    if not (template or base.model_folder) or not (folder / "config.json").is_file() and \
            not (folder / "modules.json").is_file():
        raise InputError(base.path, "cannot tell which model folder the output's config and tokenizer come from",
                         "pass --template MODEL_FOLDER (or `template:` in the recipe)")
    if (folder / "modules.json").is_file() and not base.encoder_settings:
        shutil.copytree(folder, staging, ignore=_ignore_weights, dirs_exist_ok=True)
        return transformer_folder(staging)
    from codiemb_pl.model.encoder import TextEncoder  # only here: loading transformers costs memory

    encoder = TextEncoder(str(folder), **base.encoder_settings)   # adds the sentence-transformers files
    encoder.save(staging / ".template")
    del encoder
    for item in (staging / ".template").iterdir():
        if item.name not in ("model.safetensors", "README.md"):
            item.rename(staging / item.name)
    shutil.rmtree(staging / ".template")
    return staging


def keep_member_widths(members: Sequence[OpenedCheckpoint], staging: Path, log: Callable[[str], None]) -> None:
    """Record in the output folder the Matryoshka widths all its members were trained at (`model.widths`:
    exported folders record them, a `.ckpt` in its hyper-parameters); nothing when they share none."""
    dims, notes = members_trained_dims([(member.path, member.trained_dims) for member in members])
    for note in notes:
        log(f"[codiemb fuse] {note}")
    config_file = staging / "config_sentence_transformers.json"
    config = read_json_file(config_file) or {}
    config.pop(WIDTHS_RECORD_KEY, None)
    if dims:
        config[WIDTHS_RECORD_KEY] = dims
    if config_file.is_file() or dims:
        atomic_write_text(config_file, json.dumps(config, indent=2) + "\n")


def keep_member_prompts(members: Sequence[OpenedCheckpoint], staging: Path, log: Callable[[str], None]) -> None:
    """Give the output folder in `staging` the prompt settings of its members (the template is often the bare
    base model, which knows no training instruction and pools prompts). Members that are not
    sentence-transformers folders (`.ckpt`, `.safetensors`) declare none; the template's settings then stay."""
    settings, notes = members_prompt_settings(
        [(member.path, folder_prompt_settings(member.path) if Path(member.path).is_dir() else None)
         for member in members])
    for note in notes:
        log(f"[codiemb fuse] {note}")
    if settings is not None:
        write_prompt_settings(staging, settings)
    elif any(not Path(member.path).is_dir() for member in members) and not _prompt_fields(staging).get("prompts"):
        log("[codiemb fuse] note: .ckpt / .safetensors files do not record prompts and the template declares none, "
            "so the output has no prompts; if the members were trained with instructions, pass --template one of "
            "their exported folders")


def _prompt_fields(folder: Path) -> dict[str, Any]:
    """The prompts a sentence-transformers folder declares, as card fields (`prompts.folder_prompt_settings`:
    read without loading the model)."""
    settings = folder_prompt_settings(folder)
    return {} if settings is None else {"prompts": dict(settings.prompts),
                                        "default_prompt_name": settings.default_prompt_name}


@dataclass
class FuseResult:
    """Where `fuse` wrote the merge and, when it scored it, the per-set and summary metrics."""

    output: Path
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)


def fuse(base: str | os.PathLike, models: Sequence[Mapping[str, Any]], method: str, output: str | os.PathLike, *,
         params: Mapping[str, Any] | None = None, template: str | None = None, seed: int = 0,
         eval_sets: Sequence[EvalSet] = (), eval_batch_size: int = 64,
         mixed_lora: bool = False, log: Callable[[str], None] = print) -> FuseResult:
    """Merge `models` ([{path, weight}]) against `base` with `method` into the folder `output`.

    Inputs whose config.json architecture, tensor names or shapes differ from the base, or that are too
    far from it to be fine-tuned copies, are refused before anything is written (untrained tensors that
    only some inputs carry are left out). The folder takes the prompts and `include_prompt` of the members
    (`prompts.members_prompt_settings`: the first member folder that declares prompts; a line when members
    differ), else the template's. With `eval_sets` the merged folder is scored before it
    is moved into place; the scores go into its model card (README.md) and the result.
    """
    params = dict(params or {})
    opened_base = open_checkpoint(base)
    opened = [open_checkpoint(model["path"]) for model in models]
    check_lora_mix([m.path for m in opened], [m.lora for m in opened], allow_mixed=mixed_lora)
    check_same_architecture(opened_base, opened)
    base_source, *model_sources = drop_unshared_untrained_keys([opened_base.source] + [m.source for m in opened])
    weights = prior_weights(models)
    merge = Merge(base_source, model_sources, method, params, weights=weights, seed=int(seed))
    check_shares_base(base_source, model_sources, merge.keys, [m.path for m in opened])
    result = FuseResult(Path(output))
    remove_stale_temporaries(Path(output).parent, {Path(output).name})   # a killed earlier write of this output
    with atomic_directory(output) as staging:
        weights_folder = write_template(opened_base, template, staging)
        keep_member_prompts(opened, staging, log)
        keep_member_widths(opened, staging, log)
        merge.write(weights_folder / "model.safetensors", metadata={"codiemb_fuse_method": method})
        fields, scores = {**_prompt_fields(staging), "matryoshka_dims": folder_trained_dims(staging) or []}, None
        if eval_sets:   # the encoder and the suite are imported only to score (they cost memory)
            from codiemb_pl.evaluation.suite import flat_metrics
            from codiemb_pl.model.encoder import TextEncoder

            encoder = TextEncoder.load(staging)
            result.per_set, result.summary = evaluate_at_trained_widths(encoder, eval_sets, eval_batch_size)
            scores = flat_metrics(result.per_set, result.summary)
            fields = {"pooling": encoder.pooling, "normalize": encoder.normalize,
                      "max_seq_length": encoder.max_seq_length, "embedding_dim": encoder.embedding_dim, **fields}
            del encoder
        card = build_fused_model_card(
            base_model=str(base), method=method, inputs=[str(model["path"]) for model in models], weights=weights,
            params=params, scores=scores,
            scores_source="the evaluation sets of the fuse recipe", model_path=str(output), **fields)
        atomic_write_text(staging / "README.md", card)
    return result
