"""BOOM, bagging-based merging (SPEC §7), as a sweep: runs on seeded random subsets, merged with Multi-SLERP.

    run i:   each sub-dataset D_j  ->  seeded subset S_ij, |S_ij| = max(1, round(f_i·|D_j|))
             fit with batch-level shuffling (`proportional` policy) from θ0  ->  θ_i
    BOOM:    θ* = θ0 + MultiSLERP(θ_1 − θ0, …, θ_m − θ0)          (per tensor, equal weights)

Incremental update: an update model θ_u is fit from the deployed model θ_d on the new data plus a
seeded `old_fraction` sample of the old data, then θ* = θ0 + SLERP(θ_d − θ0, θ_u − θ0; t = w)
(Multi-SLERP with weights (1 − w, w)); θ0 is the deployed model's own base.

This module only plans: which runs (fractions, seeds), each run's subset files (`OUTPUT/runs/NAME/data`,
`sweeps.subsets`), and the sweep that trains and merges them. It writes `OUTPUT/fit.yaml` (the resolved fit
config every run starts from) and `OUTPUT/sweep.yaml` (one run per bagging run: `seed_everything`, `data.seed`
and `data.train` pointing at its subset files; fusion: `multi_slerp`, exported to `OUTPUT/merged`) and hands the
sweep's plan over: `sweeps.sweep.execute_sweep` does the rest (training, finished runs skipped, unfinished ones
resumed, crashes reported; scoring on `data.val`, the leaderboard and the export with its `merge.json`).
`plan_from_options` is `codiemb boom`'s whole plan (its options, fit configs and overrides in); BOOM's
`evaluation.json` (`write_evaluation`) is the leaderboard's scores by candidate, the merge named `merged`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from codiemb_pl.cli.fit import FitConfigParser, resolve_fit_config
from codiemb_pl.data.cache.records import record_count
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.storage.atomic import atomic_write_text
from codiemb_pl.storage.output_paths import check_writable_folder
from codiemb_pl.sweeps.config import CHECKPOINT_CALLBACK, EXPORT_CALLBACK, FUSION_CALLBACK, SweepPlan, plan_sweep
from codiemb_pl.sweeps.subsets import source_dict, write_subset_sources
from codiemb_pl.sweeps.sweep import execute_sweep
from codiemb_pl.workflows.fusion.export import MERGE_MANIFEST, merge_record

FIT_CONFIG_NAME = "fit.yaml"        # OUTPUT/fit.yaml: the resolved config every run starts from
SWEEP_FILE_NAME = "sweep.yaml"      # OUTPUT/sweep.yaml: the sweep BOOM runs (`codiemb sweep --sweep` reads it)
MERGED_FOLDER = "merged"            # OUTPUT/merged: the Multi-SLERP merge
MERGE_METHOD = "multi_slerp"
UPDATE_RUN = "update"               # incremental mode: OUTPUT/runs/update
DEPLOYED_MEMBER = "deployed"


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


def _class_name(entry: Any) -> str:
    """The class name of a `{class_path, init_args}` callback entry ("" for anything else)."""
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""


def boom_fit_config(resolved: Mapping[str, Any], model_name_or_path: str | None = None) -> dict[str, Any]:
    """The fit config every BOOM run starts from: `resolved` without CheckpointFusion (BOOM merges the runs
    itself, per-run fusion would only cost time) and `ckpt_path`, with the ModelCheckpoint / ExportEncoder
    folders unset (so they follow each run's root, `runs/NAME/checkpoints` and `runs/NAME/model`) and an
    ExportEncoder added when absent; optionally starting from another model (the incremental update)."""
    fusion, export, checkpoint = (path.rsplit(".", 1)[-1] for path in (FUSION_CALLBACK, EXPORT_CALLBACK,
                                                                        CHECKPOINT_CALLBACK))
    config = json.loads(json.dumps(resolved))  # deep copy of plain data
    config.pop("ckpt_path", None)
    if model_name_or_path is not None:
        config.setdefault("model", {})["model_name_or_path"] = str(model_name_or_path)
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    callbacks = [entry for entry in (callbacks if isinstance(callbacks, list) else [callbacks])
                 if _class_name(entry) != fusion]
    for entry in callbacks:
        if _class_name(entry) in (export, checkpoint) and isinstance(entry.get("init_args"), dict):
            entry["init_args"]["dirpath"] = None
    if export not in map(_class_name, callbacks):
        callbacks.append({"class_path": EXPORT_CALLBACK})
    trainer["callbacks"] = callbacks
    return config


def run_overrides(name: str, sources: Sequence[SourceConfig], seed: int) -> dict[str, Any]:
    """A sweep run training on `sources` with `seed` (`seed_everything` and `data.seed`)."""
    return {"name": name, "seed_everything": seed, "data.seed": seed,
            "data.train": [source_dict(source) for source in sources]}


def _evaluate(resolved: Mapping[str, Any], evaluate: bool | None) -> bool:
    """Score on the validation sets: as asked, else when the config has `data.val`."""
    return bool((resolved.get("data") or {}).get("val")) if evaluate is None else bool(evaluate)


def plan_boom_sweep(fit_config: Mapping[str, Any], output: Path, runs: Sequence[Mapping[str, Any]],
                    fusion: Mapping[str, Any], manifest: Mapping[str, Any],
                    parser: Optional[FitConfigParser] = None) -> SweepPlan:
    """Write OUTPUT/fit.yaml and OUTPUT/sweep.yaml, then plan that sweep (`sweeps.config.plan_sweep`, with
    `parser` when given: BOOM resolves its fit config and every run with one parser)."""
    config_path, sweep_path = output / FIT_CONFIG_NAME, output / SWEEP_FILE_NAME
    atomic_write_text(config_path, yaml.safe_dump(dict(fit_config), sort_keys=False))
    sweep = {"config": str(config_path), "output": str(output), "runs": [dict(run) for run in runs],
             "fusion": {"checkpoints": ["final"], "export": MERGE_METHOD, "export_folder": MERGED_FOLDER,
                        **fusion},
             "manifest": dict(manifest)}
    atomic_write_text(sweep_path, "# written by `codiemb boom`: the sweep it runs (codiemb sweep --sweep THIS "
                      "--print-commands / --fuse-only work on it)\n" + yaml.safe_dump(sweep, sort_keys=False))
    return plan_sweep(sweep_path, parser=parser)


def _sources(resolved: Mapping[str, Any]) -> list[SourceConfig]:
    sources = [SourceConfig(**entry) for entry in (resolved.get("data") or {}).get("train") or []]
    if not sources:
        raise InputError("data.train", "no training sources in the fit configuration", "add sub-datasets to data.train")
    return sources


def plan_boom(resolved: Mapping[str, Any], runs: Sequence[BoomRun], output: str | Path, *,
              evaluate: bool | None = None, parser: Optional[FitConfigParser] = None) -> SweepPlan:
    """Write each run's subset files (OUTPUT/runs/NAME/data) and BOOM's sweep; returns the checked plan."""
    output = Path(output).resolve()
    sources = _sources(resolved)
    entries = [run_overrides(run.name, write_subset_sources(sources, run.fraction, run.seed,
                                                            output / "runs" / run.name / "data"), run.seed)
               for run in runs]
    return plan_boom_sweep(boom_fit_config(resolved), output, entries,
                           {"methods": [MERGE_METHOD], "evaluate": _evaluate(resolved, evaluate)},
                           {"runs": [{"name": r.name, "fraction": r.fraction, "seed": r.seed} for r in runs]}, parser)


def _result(plan: SweepPlan, fuse_only: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Execute the sweep; the facts both modes return."""
    done = execute_sweep(plan, fuse_only=fuse_only, log=log)
    return {"base": plan.base_model, "runs": {run.name: plan.run_folder(run) / "model" for run in plan.runs},
            "trained": [o.name for o in done.outcomes if o.status == "trained"], "merged": done.exported,
            "code": done.code, "outcomes": done.outcomes, "board": done.board, "plan": plan}


def run_boom(resolved: Mapping[str, Any], runs: Sequence[BoomRun], output: str | Path, *,
             evaluate: bool | None = None, fuse_only: bool = False, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Train (or reuse) every run on its subsets, then merge the exports into `output/merged` (the sweep).

    Returns {"base", "runs": {name: export folder}, "trained": [names trained now], "merged": folder (None
    when a run failed or the sweep was interrupted), "code": exit code, "outcomes", "board": Leaderboard, "plan"}.
    """
    return _result(plan_boom(resolved, runs, output, evaluate=evaluate), fuse_only, log)


def plan_incremental(resolved: Mapping[str, Any], deployed: str, base: str, new_sources: Sequence[SourceConfig],
                     output: str | Path, *, old_fraction: float = 0.1, seed: int = 0, update_weight: float = 0.5,
                     evaluate: bool | None = None, parser: Optional[FitConfigParser] = None
                     ) -> tuple[SweepPlan, dict[str, int]]:
    """The update run (from `deployed`, on the new data + a seeded `old_fraction` of the config's data, written
    to OUTPUT/runs/update/old_data) and its merge with the deployed model against `base` (weights 1 − w, w).
    Returns the plan and {old sample source: records}."""
    if not 0.0 <= old_fraction <= 1.0:
        raise InputError("boom.old_fraction", f"{old_fraction} is outside [0, 1]", "use e.g. 0.1")
    if not 0.0 < update_weight < 1.0:
        raise InputError("boom.update_weight", f"{update_weight} is outside (0, 1)", "use e.g. 0.5")
    if not new_sources:
        raise InputError("boom.new_data", "no new data sources", "list the new sub-datasets under new_data")
    output = Path(output).resolve()
    old_sources = [SourceConfig(**entry) for entry in (resolved.get("data") or {}).get("train") or []]
    folder = output / "runs" / UPDATE_RUN / "old_data"
    old_sample = write_subset_sources(old_sources, old_fraction, seed, folder) if old_fraction > 0 else []
    old_sample = [SourceConfig(**{**source_dict(s), "name": f"old_{s.name}"}) for s in old_sample]
    fusion = {"base": str(base), "members": [{"name": DEPLOYED_MEMBER, "path": str(deployed)}],
              "methods": [{"method": MERGE_METHOD, "weights": [1.0 - update_weight, update_weight]}],
              "evaluate": _evaluate(resolved, evaluate)}
    plan = plan_boom_sweep(boom_fit_config(resolved, model_name_or_path=deployed), output,
                           [run_overrides(UPDATE_RUN, list(new_sources) + old_sample, seed)], fusion,
                           {"incremental": True, "old_fraction": old_fraction, "seed": seed,
                            "update_weight": update_weight}, parser)
    return plan, {s.name: record_count(s) for s in old_sample}


def run_incremental(resolved: Mapping[str, Any], deployed: str, base: str, new_sources: Sequence[SourceConfig],
                    output: str | Path, *, old_fraction: float = 0.1, seed: int = 0, update_weight: float = 0.5,
                    evaluate: bool | None = None, fuse_only: bool = False, log: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    """Fit the update model and merge it with the deployed one into `output/merged` (see `plan_incremental`).

    Returns {"base", "deployed", "update": export folder, "trained": bool, "merged", "old_samples": {name: n},
    "code", "outcomes", "board", "plan"}.
    """
    plan, counts = plan_incremental(resolved, deployed, base, new_sources, output, old_fraction=old_fraction,
                                    seed=seed, update_weight=update_weight, evaluate=evaluate)
    result = _result(plan, fuse_only, log)
    return {**result, "deployed": deployed, "update": result["runs"][UPDATE_RUN],
            "trained": UPDATE_RUN in result["trained"], "old_samples": counts}


def write_fit_pieces(output: str | Path, fit_configs: Sequence[str | Mapping[str, Any]]) -> list[str]:
    """The fit config paths, each config piece (the rest of a YAML beside its `boom:` section) written to
    OUTPUT/fit-piece-N.yaml, so the parser reads it as a file (and its errors name the file and line)."""
    check_writable_folder(output, "--output")
    paths = []
    for index, item in enumerate(fit_configs):
        if isinstance(item, Mapping):
            piece = Path(output) / f"fit-piece-{index}.yaml"
            atomic_write_text(piece, yaml.safe_dump(dict(item), sort_keys=False))
            item = str(piece)
        paths.append(str(item))
    return paths


def parse_sources(spec: str | list, where: str) -> list[SourceConfig]:
    """SourceConfigs from a list of dicts, a YAML/JSON text of one, or a file holding one (`--new-data`)."""
    from codiemb_pl.data.eval_builders import as_source_config

    if isinstance(spec, str):
        try:
            spec = yaml.safe_load(Path(spec).read_text(encoding="utf-8")) if Path(spec).is_file() else yaml.safe_load(spec)
        except yaml.YAMLError as error:
            raise InputError(where, f"is not valid YAML ({' '.join(str(error).split())})", "fix the list") from None
    if not isinstance(spec, list) or not all(isinstance(item, dict) for item in spec):
        raise InputError(where, "must be a list of sources", 'e.g. [{name: new, task: ir, path: data/new.jsonl}]')
    return [as_source_config(item, f"{where}[{index}]") for index, item in enumerate(spec)]


def plan_from_options(options: Mapping[str, Any], fit_configs: Sequence[str | Mapping[str, Any]],
                      overrides: Sequence[str], log: Callable[[str], None] = print) -> SweepPlan:
    """`codiemb boom`'s plan from its options (`commands/boom.py`: flags and a `boom:` section): the fit configs
    (paths; pieces written by `write_fit_pieces`) resolved with the overrides (`--section.key value` tokens),
    then BOOM's bagged runs (`fractions`, `seeds`) or the incremental update (`deployed`, `new_data`, `base`,
    `old_fraction`, `update_weight`, `seed`) planned and their data written (`plan_boom` / `plan_incremental`)."""
    output = Path(options["output"])
    args = [item for path in write_fit_pieces(output, fit_configs) for item in ("--config", path)]
    parser = FitConfigParser()   # one parser for the fit config and every run of BOOM's sweep
    resolved = resolve_fit_config([*args, *overrides], parser)
    policy = (resolved.get("data") or {}).get("policy")
    if policy != "proportional":
        log(f"[codiemb boom] note: data.policy is {policy!r}; BOOM's runs use batch-level shuffling (`proportional`)")
    evaluate = options.get("evaluate")
    if options.get("incremental"):
        if not options.get("deployed") or not options.get("new_data"):
            raise InputError("codiemb boom --incremental", "needs --deployed DIR and --new-data SOURCES",
                             "name the deployed model folder and the new sub-datasets")
        plan, _ = plan_incremental(
            resolved, options["deployed"], options.get("base") or resolved["model"]["model_name_or_path"],
            parse_sources(options["new_data"], "--new-data"), output, old_fraction=float(options.get("old_fraction", 0.1)),
            seed=int(options.get("seed", 0)), update_weight=float(options.get("update_weight", 0.5)), evaluate=evaluate,
            parser=parser)
        return plan
    if not options.get("fractions"):
        raise InputError("codiemb boom", "no fractions", "pass --fractions 0.4 0.6 0.8 1.0")
    return plan_boom(resolved, plan_runs(options["fractions"], options.get("seeds")), output, evaluate=evaluate,
                     parser=parser)


def write_evaluation(plan: SweepPlan, board: Any) -> list[tuple[str, dict[str, float]]]:
    """BOOM's OUTPUT/evaluation.json, {candidate: metrics} of the base, the members and the merge (named `merged`)
    in the leaderboard's candidate order, written atomically; returns those (name, metrics) rows."""
    rows = [("merged" if c.name == plan.export else c.name, c.metrics) for c in board.candidates]
    atomic_write_text(plan.output / "evaluation.json", json.dumps(dict(rows), indent=2) + "\n")
    return rows


def merge_exports(base: str, exports: Sequence[str | Path], output: str | Path, *,
                  weights: Sequence[float] | None = None, manifest: Mapping[str, Any] | None = None) -> Path:
    """θ0 + MultiSLERP(θ_k − θ0) of already exported models into a sentence-transformers folder: the one merge
    of `codiemb fuse` (`workflows.fusion.fuse.fuse`, template = the first export), plus `merge.json`
    (`merge_record` + `manifest`). For members trained elsewhere (the benchmarks); `run_boom` trains its own."""
    from codiemb_pl.workflows.fusion.fuse import fuse

    if not exports:
        raise InputError("boom.merge", "no exported models to merge", "train at least one run")
    models = [{"path": str(path)} if weights is None else {"path": str(path), "weight": float(weight)}
              for path, weight in zip(exports, weights or [None] * len(exports))]
    fuse(base, models, MERGE_METHOD, output, template=str(exports[0]))
    record = merge_record(MERGE_METHOD, base, exports, weights, **dict(manifest or {}))
    atomic_write_text(Path(output) / MERGE_MANIFEST, json.dumps(record, indent=2) + "\n")
    return Path(output)
