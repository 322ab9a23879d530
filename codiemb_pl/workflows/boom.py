"""BOOM, bagging-based merging (SPEC §7): train on random subsets of the data, merge with Multi-SLERP.

    run i:   each sub-dataset D_j  ->  seeded subset S_ij, |S_ij| = max(1, round(f_i·|D_j|))
             fit with batch-level shuffling (`proportional` policy) from θ0  ->  θ_i
    BOOM:    θ* = θ0 + MultiSLERP(θ_1 − θ0, …, θ_m − θ0)          (per tensor, equal weights)

Incremental update: an update model θ_u is fit from the deployed model θ_d on the new data plus a
seeded `old_fraction` sample of the old data, then θ* = θ0 + SLERP(θ_d − θ0, θ_u − θ0; t = w)
(Multi-SLERP with weights (1 − w, w)); θ0 is the deployed model's own base.

Each run lives in its own folder (subset jsonl files, the resolved `fit.yaml`, checkpoints, the
exported `model/`) and trains through `codiemb fit` in-process. A run whose export is complete is
reused; one with a `last.ckpt` but no export resumes from it; a changed configuration is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from codiemb_pl.atomic import atomic_directory, atomic_write_text
from codiemb_pl.data.records import IRRecord, STSRecord
from codiemb_pl.data.sources import SourceConfig, load_training_records
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.engine import merge_to_safetensors
from codiemb_pl.fusion.keys import key_seed
from codiemb_pl.fusion.sources import MappingSource
from codiemb_pl.model_card import build_fused_model_card
from codiemb_pl.workflows.validation import build_validation_sets

EXPORT_CALLBACK = "codiemb_pl.callbacks.ExportEncoder"
CHECKPOINT_CALLBACK_NAME = "ModelCheckpoint"
FIT_CONFIG_NAME = "fit.yaml"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MERGE_MANIFEST = "merge.json"


@dataclass(frozen=True)
class BoomRun:
    """One bagging run: the fraction of every sub-dataset it trains on and its seed."""

    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"f{self.fraction:g}_s{self.seed}"


def plan_runs(fractions: Sequence[float], seeds: Sequence[int] | None = None) -> list[BoomRun]:
    """Pair fractions with seeds: one seed per fraction, one seed for all, or (default) seeds 0..m−1."""
    if not fractions:
        raise InputError("boom.fractions", "no fractions", "e.g. --fractions 0.4 0.6 0.8 1.0")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise InputError("boom.fractions", f"fraction {fraction} is outside (0, 1]", "use e.g. 0.4 0.6 0.8 1.0")
    seeds = list(range(len(fractions))) if seeds is None or len(seeds) == 0 else list(seeds)
    if len(seeds) == 1:
        seeds = seeds * len(fractions)
    if len(seeds) != len(fractions):
        raise InputError("boom.seeds", f"{len(seeds)} seeds for {len(fractions)} fractions",
                         "give one seed, or one seed per fraction")
    runs = [BoomRun(float(f), int(s)) for f, s in zip(fractions, seeds)]
    duplicates = sorted({run.name for run in runs if runs.count(run) > 1})
    if duplicates:
        raise InputError("boom.seeds", f"runs {duplicates} appear twice (same fraction and seed)",
                         "give those runs different seeds")
    return runs



def subset_size(total: int, fraction: float) -> int:
    """max(1, round(fraction·total)), never more than total."""
    return min(total, max(1, round(fraction * total)))


def subset_indices(total: int, fraction: float, seed: int, source_name: str) -> list[int]:
    """Sorted indices of a seeded random subset of `subset_size(total, fraction)` items of one sub-dataset."""
    rng = random.Random(key_seed(seed, source_name))
    return sorted(rng.sample(range(total), subset_size(total, fraction)))


def record_json(record: IRRecord | STSRecord) -> dict[str, Any]:
    """A record as a jsonl row our readers read back identically (STS scores already in [0, 1])."""
    if isinstance(record, IRRecord):
        return {"query": record.query, "positives": list(record.positives), "negatives": list(record.negatives)}
    return {"text1": record.text1, "text2": record.text2, "score": record.score}


def write_subset_sources(sources: Sequence[SourceConfig], fraction: float, seed: int,
                         folder: str | Path) -> list[SourceConfig]:
    """Write each source's seeded subset to `folder/<name>.jsonl`; return sources reading those files.

    The subset is drawn from the records the source yields (after its own `max_samples`); name, task,
    instruction and batch size are kept; STS files hold normalised scores (`score_range: [0, 1]`).
    """
    folder = Path(folder)
    subset_sources = []
    for source in sources:
        records = load_training_records(source)
        chosen = [records[i] for i in subset_indices(len(records), fraction, seed, source.name)]
        path = folder / f"{source.name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(record_json(r), ensure_ascii=False) + "\n" for r in chosen))
        subset_sources.append(SourceConfig(name=source.name, task=source.task, path=str(path.resolve()),
                                           format="jsonl", score_range=[0.0, 1.0] if source.task == "sts" else None,
                                           instruction=source.instruction, batch_size=source.batch_size))
    return subset_sources


def source_dict(source: SourceConfig) -> dict[str, Any]:
    """The non-default fields of a SourceConfig, as a fit config lists them."""
    fields = ("name", "task", "path", "format", "split", "columns", "score_range", "instruction", "batch_size",
              "max_samples", "seed", "subset")
    return {name: getattr(source, name) for name in fields if getattr(source, name) not in (None, "auto")}


def resolve_fit_config(config_paths: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully resolved fit configuration (`codiemb fit --config ... OVERRIDES --print_config`) as a dict."""
    from codiemb_pl.cli import main

    args = ["fit"]
    for path in config_paths:
        args += ["--config", str(path)]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = main(args + list(overrides) + ["--print_config"])
    except SystemExit as stop:
        code = stop.code
    if code not in (0, None):
        raise InputError(" ".join(map(str, config_paths)) or "boom --config",
                         "the fit configuration does not parse (see the message above)",
                         "check it first with `codiemb fit --config FILE --print_config`")
    return yaml.safe_load(printed.getvalue())


def _as_list(value: Any) -> list:
    if value in (None, False, True):
        return []
    return list(value) if isinstance(value, list) else [value]


def _run_callbacks(callbacks: list, run_folder: Path) -> list:
    """Callbacks writing into the run folder: ModelCheckpoint -> checkpoints/, the (first) ExportEncoder
    -> model/ (appended when absent), any other explicit `dirpath` -> <class name>/; order kept.
    CheckpointFusion is dropped: BOOM merges the runs itself, per-run fusion would only cost time."""
    kept, exported = [], False
    for callback in callbacks:
        if not isinstance(callback, dict):
            kept.append(callback)
            continue
        class_name = str(callback.get("class_path", "")).rsplit(".", 1)[-1]
        if class_name == "CheckpointFusion":
            continue
        init_args = callback.setdefault("init_args", {})
        if class_name == EXPORT_CALLBACK.rsplit(".", 1)[-1]:
            if exported:
                continue
            init_args["dirpath"], exported = str(run_folder / "model"), True
        elif class_name == CHECKPOINT_CALLBACK_NAME:
            init_args["dirpath"] = str(run_folder / "checkpoints")
        elif init_args.get("dirpath"):
            init_args["dirpath"] = str(run_folder / class_name.lower())
        kept.append(callback)
    if not exported:
        kept.append({"class_path": EXPORT_CALLBACK, "init_args": {"dirpath": str(run_folder / "model")}})
    return kept


def run_fit_config(resolved: Mapping[str, Any], run_folder: Path, train_sources: Sequence[SourceConfig], seed: int,
                   model_name_or_path: str | None = None) -> dict[str, Any]:
    """`resolved` rewritten for one run: its data, seed, folders (root, checkpoints, logs) and export."""
    config = json.loads(json.dumps(resolved))  # deep copy of plain data
    trainer, data = config.setdefault("trainer", {}), config.setdefault("data", {})
    config["seed_everything"] = seed
    data["seed"] = seed
    data["train"] = [source_dict(s) for s in train_sources]
    if model_name_or_path is not None:
        config.setdefault("model", {})["model_name_or_path"] = str(model_name_or_path)
    trainer["default_root_dir"] = str(run_folder)
    for logger in _as_list(trainer.get("logger")):
        if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
            logger["init_args"]["save_dir"] = str(run_folder / "logs")
    trainer["callbacks"] = _run_callbacks(_as_list(trainer.get("callbacks")), run_folder)
    config.pop("ckpt_path", None)
    return config


def is_finished_export(folder: str | Path) -> bool:
    """A complete sentence-transformers export: modules.json and weights (exports are written atomically)."""
    folder = Path(folder)
    return (folder / "modules.json").is_file() and any(folder.glob("*.safetensors"))


def train_run(fit_config: Mapping[str, Any], run_folder: str | Path) -> tuple[Path, bool]:
    """Fit one run in-process unless its export exists; returns (export folder, trained now?).

    The run's `fit.yaml` is written first; an existing different `fit.yaml` is an error (stale cache).
    A `checkpoints/last.ckpt` without an export resumes that fit.
    """
    from codiemb_pl.cli import main

    run_folder = Path(run_folder)
    export, config_path = run_folder / "model", run_folder / FIT_CONFIG_NAME
    text = yaml.safe_dump(dict(fit_config), sort_keys=False)
    if config_path.is_file() and config_path.read_text(encoding="utf-8") != text:
        raise InputError(str(config_path), "this run folder was made with a different configuration",
                         "use another --output, or delete the run folder to retrain it")
    if is_finished_export(export):
        return export, False
    atomic_write_text(config_path, text)
    args = ["fit", "--config", str(config_path)]
    last = run_folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        args += ["--ckpt_path", str(last)]
    code = main(args)
    if code != 0 or not is_finished_export(export):
        raise InputError(str(run_folder), f"training this run failed (exit code {code}) or wrote no export",
                         "see the messages above; rerun to resume from its last checkpoint")
    return export, True


def transformer_state(model_name_or_path: str) -> dict:
    """θ0 named as in an export: the transformer's state dict without pooler weights (`TextEncoder.save`)."""
    from codiemb_pl.encoder import TextEncoder

    state = TextEncoder(str(model_name_or_path)).model.state_dict()
    return {key: value for key, value in state.items() if not key.startswith("pooler.")}


def merge_exports(base: str, exports: Sequence[str | Path], output: str | Path, *,
                  weights: Sequence[float] | None = None, manifest: Mapping[str, Any] | None = None) -> Path:
    """θ0 + MultiSLERP(θ_k − θ0) of exported models, written as a sentence-transformers folder (atomically).

    The folder copies the first export's tokenizer, configs and modules and holds the merged
    `model.safetensors`; `merge.json` records the inputs (`manifest` is added to it), README.md is its model card.
    """
    if not exports:
        raise InputError("boom.merge", "no exported models to merge", "train at least one run")
    first = Path(exports[0])
    with atomic_directory(output) as staging:
        for item in first.iterdir():
            if item.name.endswith(".safetensors") or item.name in (SAFETENSORS_INDEX, "README.md", MERGE_MANIFEST):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        merge_to_safetensors(MappingSource(transformer_state(base), str(base)), list(exports), "multi_slerp", {},
                             staging / "model.safetensors", weights=weights)
        record = {"method": "multi_slerp", "base": str(base), "models": [str(Path(p).resolve()) for p in exports],
                  "weights": None if weights is None else list(weights), **dict(manifest or {})}
        atomic_write_text(staging / MERGE_MANIFEST, json.dumps(record, indent=2) + "\n")
        atomic_write_text(staging / "README.md", build_fused_model_card(
            base_model=str(base), method="multi_slerp", inputs=record["models"], weights=record["weights"],
            scores_source="", model_path=str(output)))
    return Path(output)


def run_boom(resolved: Mapping[str, Any], runs: Sequence[BoomRun], output: str | Path) -> dict[str, Any]:
    """Train (or reuse) every run on its subsets, then merge the exports into `output/merged`.

    Returns {"base", "runs": {name: export folder}, "trained": [names trained now], "merged": folder}.
    """
    output = Path(output).resolve()
    base = resolved["model"]["model_name_or_path"]
    sources = [SourceConfig(**entry) for entry in resolved["data"].get("train") or []]
    if not sources:
        raise InputError("data.train", "no training sources in the fit configuration", "add sub-datasets to data.train")
    exports, trained = {}, []
    for run in runs:
        folder = output / "runs" / run.name
        subsets = write_subset_sources(sources, run.fraction, run.seed, folder / "data")
        exports[run.name], fitted = train_run(run_fit_config(resolved, folder, subsets, run.seed), folder)
        if fitted:
            trained.append(run.name)
    merged = merge_exports(base, list(exports.values()), output / "merged",
                           manifest={"runs": [{"name": r.name, "fraction": r.fraction, "seed": r.seed} for r in runs]})
    return {"base": base, "runs": exports, "trained": trained, "merged": merged}


def run_incremental(resolved: Mapping[str, Any], deployed: str, base: str, new_sources: Sequence[SourceConfig],
                    output: str | Path, *, old_fraction: float = 0.1, seed: int = 0,
                    update_weight: float = 0.5) -> dict[str, Any]:
    """Fit an update model from `deployed` on the new data + a seeded `old_fraction` of the config's data,
    then merge it with the deployed model against `base` (weights 1 − w, w) into `output/merged`.

    Returns {"base", "deployed", "update": export folder, "trained": bool, "merged": folder, "old_samples": {name: n}}.
    """
    if not 0.0 <= old_fraction <= 1.0:
        raise InputError("boom.old_fraction", f"{old_fraction} is outside [0, 1]", "use e.g. 0.1")
    if not 0.0 < update_weight < 1.0:
        raise InputError("boom.update_weight", f"{update_weight} is outside (0, 1)", "use e.g. 0.5")
    if not new_sources:
        raise InputError("boom.new_data", "no new data sources", "list the new sub-datasets under new_data")
    output = Path(output).resolve()
    folder = output / "update"
    old_sources = [SourceConfig(**entry) for entry in resolved["data"].get("train") or []]
    old_sample = write_subset_sources(old_sources, old_fraction, seed, folder / "old_data") if old_fraction > 0 else []
    old_sample = [SourceConfig(**{**source_dict(s), "name": f"old_{s.name}"}) for s in old_sample]
    train_sources = list(new_sources) + old_sample
    update, fitted = train_run(run_fit_config(resolved, folder, train_sources, seed, model_name_or_path=deployed),
                               folder)
    merged = merge_exports(base, [deployed, update], output / "merged", weights=[1.0 - update_weight, update_weight],
                           manifest={"incremental": True, "old_fraction": old_fraction, "seed": seed})
    counts = {s.name: len(load_training_records(s)) for s in old_sample}
    return {"base": base, "deployed": deployed, "update": update, "trained": fitted, "merged": merged,
            "old_samples": counts}


def evaluate_models(models: dict[str, str], resolved: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """[(label, {val/<set>/<metric>: value})] for each model folder, as the fit's validation reports them."""
    from codiemb_pl.encoder import TextEncoder
    from codiemb_pl.evaluation.suite import evaluate_encoder, flat_metrics

    data, model = resolved.get("data") or {}, resolved.get("model") or {}
    sets = build_validation_sets(data.get("val") or [], instruction_template=data.get("instruction_template"),
                                 passage_prefix=data.get("passage_prefix"), where="data.val")
    batch_size = int(data.get("val_batch_size") or 64)
    settings = {key: model.get(key) for key in ("pooling", "normalize", "max_seq_length")}
    rows = []
    for label, path in models.items():
        overrides = settings if path == model.get("model_name_or_path") else {}
        encoder = TextEncoder(str(path), include_prompt=False, **overrides)
        per_set, summary = evaluate_encoder(encoder, sets, batch_size=batch_size)
        rows.append((label, flat_metrics(per_set, summary)))
    return rows
