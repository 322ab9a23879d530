"""Sweeps: train K runs of one base config with different settings, then fuse them across trajectories.

    plan = plan_sweep("configs/sweeps/policies.yaml", config="configs/quickstart.yaml", output="runs/sweep")
    outcomes = train_runs(plan)                  # each run: `codiemb fit --config BASE OVERRIDES
                                                 #   --trainer.default_root_dir OUTPUT/runs/NAME`, in-process
    board = fuse_sweep(plan)                     # members + merges scored, leaderboard.json, OUTPUT/model

A sweep file (YAML) names the runs as config overrides (dotted keys, as `codiemb fit --print_config`
shows them) and how to fuse them:

    config: configs/quickstart.yaml          # base fit config (`--config` wins); relative to the working folder
    output: runs/sweep_policies              # (`--output` wins)
    overrides: {trainer.max_epochs: 1}       # applied to every run
    runs:                                    # named runs; every key but `name` is an override
      - {name: proportional, data.policy: proportional}
      - {name: balanced, data.policy: balanced}
    grid: {seed_everything: [1, 2]}          # cartesian product of value lists (× each listed run)
    fusion:
      checkpoints: [final]                   # final = OUTPUT/runs/NAME/model (the run's export);
                                             # last, best_ir, best_sts, best, epochN, stepN = its
                                             # CheckpointFusion snapshots (the base config must collect them)
      methods: [...]                         # as CheckpointFusion.methods (default: DEFAULT_METHODS)
      metric: val/avg                        # picks the winner (higher is better)
      seed: 0                                # DARE / Self Positioning (default: seed_everything)
      base: PATH                             # θ0 of the merges (default: model.model_name_or_path)
      members: [{name: old, path: PATH}]     # fixed models merged with the runs (listed first)
      export: multi_slerp                    # export this candidate instead of the winner
      export_folder: model                   # OUTPUT/<export_folder> (default: model)
      evaluate: true                         # false: merge without scoring (needs `export`, no greedy_soup)
    manifest: {...}                          # facts recorded in leaderboard.json and the export's merge.json

Everything is checked before anything is written (unknown keys, bad values resolved through the real
CLI, runs that would share an output folder, a run whose finished output was made with other settings, a
fusion metric `data.val` will not give, methods and their parameters for the member count).
A run whose export is complete is skipped; one with `checkpoints/last.ckpt` and no export resumes from
it; a crashed run is reported and the rest continue (fusion waits until every run has finished); SIGTERM /
SIGINT stops the sweep after the current run saved its last.ckpt (exit code 0, as `codiemb fit`).
Fusion: θ0 = `fusion.base` or `model.model_name_or_path`, members = `fusion.members` then the chosen
checkpoint of every run, merged with every method by `workflows.fusion.run_fusion` (base, members and
merges scored on `data.val`), leaderboard printed and written (`leaderboard.json` / `.md`), logged as a
W&B table when the base config has a WandbLogger, and the winner (or `fusion.export`) exported to
`OUTPUT/model` (or `fusion.export_folder`): a sentence-transformers folder with a model card and
`merge.json` (method, θ0, members, weights, scores, `manifest`). `codiemb boom` is such a sweep
(`workflows.boom` plans its runs and writes their data).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import itertools
import json
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text
from codiemb_pl.cli.moved_paths import normalise_paths
from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location

SWEEP_KEYS = ("config", "output", "overrides", "runs", "grid", "fusion", "manifest")
FUSION_KEYS = ("checkpoints", "methods", "metric", "seed", "eval_batch_size", "base", "members", "export",
               "export_folder", "evaluate")
FINAL = "final"                       # the run's export folder, <run>/model
EXPORT_FOLDER = "model"               # OUTPUT/model: the exported candidate (default: the winner)
MERGE_MANIFEST = "merge.json"         # in the exported folder: how it was made
RESERVED_FOLDERS = ("runs", "fusion")  # OUTPUT/runs/NAME, OUTPUT/fusion/
SNAPSHOT_MOMENTS = ("last", "best_ir", "best_sts", "best")   # CheckpointFusion.collect moments
MANAGED_KEYS = {"trainer.default_root_dir": "the sweep puts every run in OUTPUT/runs/NAME",
                "ckpt_path": "the sweep resumes a run from its own last.ckpt"}
DEFAULT_METHODS: list[dict[str, Any]] = [
    {"method": "delta_guided", "params": {"gamma": 1.0}},
    {"method": "uniform_soup"},
    {"method": "greedy_soup"},
    {"method": "ties", "params": {"density": 0.2}},
    {"method": "dare", "params": {"drop_rate": 0.5}},
    {"method": "multi_slerp"},
    {"method": "self_positioning", "params": {"steps": 200}},
]
EXPORT_CALLBACK = "codiemb_pl.callbacks.ExportEncoder"
FUSION_CALLBACK = "codiemb_pl.callbacks.CheckpointFusion"
CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"
RUN_RECORD = "sweep_run.json"
ERROR_PREFIX = "codiemb: error: "     # how `codiemb_pl.cli.main.main` reports an InputError on stderr
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
SNAPSHOT_CHOICE = re.compile(r"^(last|best_ir|best_sts|best|epoch\d+|step\d+)$")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name (its folder under OUTPUT/runs) and its own config overrides."""

    name: str
    overrides: dict[str, Any]


@dataclass
class SweepPlan:
    """A checked sweep: the base config, the runs, how to fuse them, and each run's resolved config."""

    sweep_file: str
    base_config: str
    output: Path
    extra_args: list[str]                     # fit overrides from the command line, for every run
    common: dict[str, Any]                    # the sweep file's `overrides`
    runs: list[SweepRun]
    checkpoints: list[str]
    methods: list[Any]                        # workflows.fusion.MethodSpec
    metric: str
    seed: int
    eval_batch_size: int
    resolved: dict[str, Any]                  # base + command line + common overrides, resolved
    run_configs: dict[str, dict[str, Any]] = field(default_factory=dict)   # run name -> resolved config
    base_model: str = ""                      # θ0 of the merges (fusion.base; default model.model_name_or_path)
    members: list[tuple[str, str]] = field(default_factory=list)   # fusion.members: (label, location)
    export: str | None = None                 # candidate to export (None: the winner)
    export_folder: str = EXPORT_FOLDER
    evaluate: bool = True                     # score base, members and merges on data.val
    manifest: dict[str, Any] = field(default_factory=dict)   # recorded in leaderboard.json and merge.json

    def run_folder(self, run: SweepRun) -> Path:
        return self.output / "runs" / run.name

    def fit_args(self, run: SweepRun) -> list[str]:
        """`codiemb fit` arguments of `run` (without the leading `codiemb`)."""
        return (["fit", "--config", self.base_config, *self.extra_args, *override_args(self.common),
                 *override_args(run.overrides), "--trainer.default_root_dir", str(self.run_folder(run))])

    def command_line(self, run: SweepRun) -> str:
        return "codiemb " + shlex.join(self.fit_args(run))

    def member_label(self, run: SweepRun, choice: str) -> str:
        return member_label(run, choice, self.checkpoints)


def member_label(run: SweepRun, choice: str, checkpoints: Sequence[str]) -> str:
    """A run's member in the leaderboard: its name, or NAME:CHECKPOINT when several checkpoints are chosen."""
    return run.name if len(checkpoints) == 1 else f"{run.name}:{choice}"


# ----------------------------------------------------------------------------------------------------
# reading and checking a sweep file
# ----------------------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The sweep file as a mapping with only known top-level keys (else one-line InputError)."""
    try:
        content = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except FileNotFoundError:
        raise InputError(str(path), "sweep file not found", "check the --sweep path") from None
    except yaml.YAMLError as error:
        raise InputError(str(path), f"is not valid YAML ({' '.join(str(error).split())})",
                         "fix the sweep file") from None
    if not isinstance(content, dict):
        raise InputError(str(path), "a sweep file must be a mapping", f"use the keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(map(str, content)) - set(SWEEP_KEYS))
    if unknown:
        raise InputError(f"{path}: {unknown[0]}", "unknown sweep key", f"use {list(SWEEP_KEYS)}")
    return content


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`{dotted.key: value}` as `codiemb fit` arguments: `--dotted.key VALUE` (lists and mappings as JSON)."""
    args: list[str] = []
    for key, value in overrides.items():
        args += [f"--{key}", cli_value(value)]
    return args


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it back: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _overrides(entries: Any, where: str) -> dict[str, Any]:
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise InputError(where, "overrides must be a mapping of dotted config keys",
                         "e.g. {data.policy: balanced, model.lr: 3.0e-5}")
    for key in entries:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise InputError(f"{where}: {key!r}", "not a dotted config key", "write keys like data.policy (no dashes)")
        if key in MANAGED_KEYS:
            raise InputError(f"{where}: {key}", f"cannot be overridden ({MANAGED_KEYS[key]})", "remove this key")
    return dict(entries)


def _listed_runs(entries: Any, where: str) -> list[SweepRun]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InputError(f"{where}: runs", "must be a list of runs", "e.g. runs: [{name: a, data.policy: balanced}]")
    runs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise InputError(f"{where}: runs[{index}]", "a run must be a mapping with a `name`",
                             "e.g. {name: balanced, data.policy: balanced}")
        name = entry["name"]
        overrides = {key: value for key, value in entry.items() if key != "name"}
        runs.append(SweepRun(str(name), _overrides(overrides, f"{where}: run {name!r}")))
    return runs


def _grid_points(grid: Any, where: str) -> list[SweepRun]:
    """One SweepRun per point of the cartesian product; named `key-value_key-value` (last key part)."""
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise InputError(f"{where}: grid", "must be a non-empty mapping of dotted keys to value lists",
                         "e.g. grid: {seed_everything: [1, 2, 3]}")
    keys = list(_overrides(grid, f"{where}: grid"))
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise InputError(f"{where}: grid: {key}", "must be a non-empty list of values", f"e.g. {key}: [1, 2]")
    points = []
    for values in itertools.product(*(grid[key] for key in keys)):
        name = "_".join(f"{key.rsplit('.', 1)[-1]}-{_name_part(value)}" for key, value in zip(keys, values))
        points.append(SweepRun(name, dict(zip(keys, values))))
    return points


def _name_part(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", cli_value(value)).strip("-") or "x"


def expand_runs(content: Mapping[str, Any], where: str) -> list[SweepRun]:
    """The listed runs, the grid points, or each listed run × each grid point; names checked and unique."""
    listed, points = _listed_runs(content.get("runs"), where), _grid_points(content.get("grid"), where)
    if listed and points:
        runs = [SweepRun(f"{run.name}_{point.name}", {**run.overrides, **point.overrides})
                for run in listed for point in points]
    else:
        runs = listed or points
    if not runs:
        raise InputError(where, "no runs", "list them under `runs:` (each with a name) or give a `grid:`")
    seen: set[str] = set()
    for run in runs:
        if not RUN_NAME.match(run.name):
            raise InputError(f"{where}: run {run.name!r}", "a run name must be a folder name",
                             "use letters, digits, '.', '_', '-' and '=' (no spaces or slashes)")
        if run.name in seen:
            raise InputError(f"{where}: run {run.name!r}", "two runs have this name", "give every run its own name")
        seen.add(run.name)
    return runs


def check_keys(overrides: Mapping[str, Any], resolved: Mapping[str, Any], where: str) -> None:
    """Each dotted key must name a config entry; checked down to the first class_path or non-mapping
    (beyond that, e.g. `trainer.logger.init_args.project`, the CLI itself judges when resolving)."""
    for key in overrides:
        node: Any = resolved
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or "class_path" in node:
                break
            if part not in node:
                prefix = ".".join(key.split(".")[:depth])
                known = [f"{prefix}.{name}" if prefix else name for name in node]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise InputError(f"{where}: {key}", "unknown config key",
                                 f"{hint}keys are dotted paths as `codiemb fit --print_config` shows them")
            node = node[part]


def resolve_fit_config(config_paths: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully resolved fit configuration (`codiemb fit --config ... OVERRIDES --print_config`) as a dict."""
    from codiemb_pl.cli.main import main

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
        raise InputError(" ".join(map(str, config_paths)) or "--config",
                         "the fit configuration does not parse (see the message above)",
                         "check it first with `codiemb fit --config FILE --print_config`")
    return yaml.safe_load(printed.getvalue())


def resolve_run_config(base_config: str, args: Sequence[str], where: str) -> dict[str, Any]:
    """The resolved fit config (`codiemb fit --config BASE ARGS --print_config`); its one error line otherwise."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return resolve_fit_config([base_config], list(args))
    except InputError:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        reported = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
        message = (reported or lines or ["does not parse"])[-1]
        raise InputError(where, f"the fit configuration does not resolve: {message}",
                         "fix that value in the sweep file") from None


def _callbacks(resolved: Mapping[str, Any], class_path: str) -> list[dict[str, Any]]:
    """The resolved `trainer.callbacks` entries of `class_path` or a subclass of it."""
    from codiemb_pl.cli.run_folder import _is_subclass

    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    entries = (resolved.get("trainer") or {}).get("callbacks") or []
    return [entry for entry in entries if isinstance(entry, dict) and _is_subclass(entry.get("class_path"), cls)]


def _check_run_config(plan: SweepPlan, run: SweepRun, resolved: Mapping[str, Any], where: str) -> None:
    """Folders inside the run's root; the same θ0 as the sweep; a CheckpointFusion metric its data.val gives;
    the snapshots the fusion needs are collected."""
    from codiemb_pl.workflows.fusion import check_metric

    root = plan.run_folder(run).resolve()
    for class_path in (EXPORT_CALLBACK, FUSION_CALLBACK, CHECKPOINT_CALLBACK):
        for entry in _callbacks(resolved, class_path):
            dirpath = (entry.get("init_args") or {}).get("dirpath")
            if dirpath and not Path(dirpath).resolve().is_relative_to(root):
                raise InputError(f"{where}: {class_path.rsplit('.', 1)[-1]}.dirpath",
                                 f"is set ({dirpath}), so every run would write to the same folder",
                                 "leave it unset in the base config so it follows trainer.default_root_dir")
    base = (resolved.get("model") or {}).get("model_name_or_path")
    if base != plan.resolved["model"]["model_name_or_path"]:
        raise InputError(f"{where}: model.model_name_or_path", f"{base!r} differs from the model the sweep "
                         f"starts from, {plan.resolved['model']['model_name_or_path']!r}",
                         "runs fused together must start from the same model; set it in `overrides:`")
    fusions = _callbacks(resolved, FUSION_CALLBACK)
    for entry in fusions:   # the run's own CheckpointFusion would otherwise find out after training
        metric = (entry.get("init_args") or {}).get("metric")
        if metric is not None:
            check_metric(metric, validation_tasks(resolved), f"{where}: CheckpointFusion.metric")
    snapshots = [choice for choice in plan.checkpoints if choice != FINAL]
    if not snapshots:
        return
    collect = set((fusions[0].get("init_args") or {}).get("collect") or []) if fusions else set()
    steps = int((fusions[0].get("init_args") or {}).get("every_n_steps") or 0) if fusions else 0
    for choice in snapshots:
        needed = "epoch" if choice.startswith("epoch") else choice
        kept = steps > 0 if choice.startswith("step") else needed in collect
        if not kept:
            raise InputError(f"{where}: fusion.checkpoints: {choice}", "this run keeps no such snapshot",
                             "set CheckpointFusion.every_n_steps in the base config" if choice.startswith("step")
                             else f"collect it: {FUSION_CALLBACK} with collect: [..., {needed}] in the base config")


def validation_tasks(resolved: Mapping[str, Any]) -> dict[str, str]:
    """{set name: task} of a resolved fit config's `data.val` (what fusion scores candidates on)."""
    entries = (resolved.get("data") or {}).get("val") or []
    return {str(entry.get("name")): str(entry.get("task")) for entry in entries if isinstance(entry, Mapping)}


def _fusion_options(section: Any, where: str, runs: int = 1) -> dict[str, Any]:
    """The checked `fusion:` section of a sweep with `runs` runs (methods are tried with the member count)."""
    from codiemb_pl.workflows.fusion import parse_methods

    section = {} if section is None else section
    if not isinstance(section, dict):
        raise InputError(f"{where}: fusion", "must be a mapping", f"use the keys {list(FUSION_KEYS)}")
    unknown = sorted(set(map(str, section)) - set(FUSION_KEYS))
    if unknown:
        raise InputError(f"{where}: fusion.{unknown[0]}", "unknown fusion key", f"use {list(FUSION_KEYS)}")
    checkpoints = section.get("checkpoints", [FINAL])
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    if not isinstance(checkpoints, list) or not checkpoints:
        raise InputError(f"{where}: fusion.checkpoints", "must be a non-empty list", "e.g. [final, best_ir, best_sts]")
    for choice in checkpoints:
        if choice != FINAL and not SNAPSHOT_CHOICE.match(str(choice)):
            raise InputError(f"{where}: fusion.checkpoints: {choice}", "unknown checkpoint",
                             "use final (the run's export) or a CheckpointFusion snapshot: last, best_ir, "
                             "best_sts, best, epochN, stepN")
    if len(set(checkpoints)) != len(checkpoints):
        raise InputError(f"{where}: fusion.checkpoints", "a checkpoint is named twice", "name each once")
    members = _fixed_members(section.get("members"), where)
    methods = parse_methods(section.get("methods", DEFAULT_METHODS), f"{where}: fusion.methods",
                            members=len(members) + runs * len(checkpoints))
    if not methods:
        raise InputError(f"{where}: fusion.methods", "no merge methods", "list at least one, e.g. [delta_guided]")
    for name in ("metric",):
        if name in section and not isinstance(section[name], str):
            raise InputError(f"{where}: fusion.{name}", "must be a metric name", "e.g. val/avg")
    for name in ("seed", "eval_batch_size"):
        if name in section and (not isinstance(section[name], int) or isinstance(section[name], bool)):
            raise InputError(f"{where}: fusion.{name}", "must be an integer", f"e.g. {name}: 0")
    evaluate = section.get("evaluate", True)
    if not isinstance(evaluate, bool):
        raise InputError(f"{where}: fusion.evaluate", "must be true or false", "e.g. evaluate: false")
    export = section.get("export")
    if export is not None and not isinstance(export, str):
        raise InputError(f"{where}: fusion.export", "must be a candidate name", "e.g. export: multi_slerp")
    if not evaluate and export is None:
        raise InputError(f"{where}: fusion.evaluate", "without scores there is no winner to export",
                         "name the candidate to export, e.g. export: multi_slerp")
    if not evaluate and any(spec.method == "greedy_soup" for spec in methods):
        raise InputError(f"{where}: fusion.methods", "greedy_soup needs scores but fusion.evaluate is false",
                         "remove greedy_soup or set evaluate: true")
    folder = section.get("export_folder", EXPORT_FOLDER)
    if not isinstance(folder, str) or not RUN_NAME.match(folder) or folder in RESERVED_FOLDERS:
        raise InputError(f"{where}: fusion.export_folder", f"{folder!r} is not a folder name the sweep leaves free",
                         f"use a plain name other than {' or '.join(RESERVED_FOLDERS)}, e.g. model")
    base = section.get("base")
    if base is not None and (not isinstance(base, str) or not Path(resolve_location(base)).exists()):
        raise InputError(f"{where}: fusion.base", f"{base!r} is not an existing model folder",
                         "name θ0's folder (default: model.model_name_or_path)")
    return {"checkpoints": [str(c) for c in checkpoints], "methods": methods,
            "metric": section.get("metric", "val/avg"), "seed": section.get("seed"),
            "eval_batch_size": section.get("eval_batch_size"), "base": base, "evaluate": evaluate,
            "export": export, "export_folder": folder, "members": members}


def _fixed_members(entries: Any, where: str) -> list[tuple[str, str]]:
    """`fusion.members`: [{name, path}] of models (folders, .safetensors) merged with the runs' checkpoints."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InputError(f"{where}: fusion.members", "must be a list", "e.g. members: [{name: old, path: runs/old/model}]")
    members = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", "path"} or not all(
                isinstance(value, str) for value in entry.values()):
            raise InputError(f"{where}: fusion.members[{index}]", "a member is a mapping {name, path}",
                             "e.g. {name: deployed, path: runs/boom/merged}")
        if not RUN_NAME.match(entry["name"]):
            raise InputError(f"{where}: fusion.members[{index}]", f"{entry['name']!r} is not a plain name",
                             "use letters, digits, '.', '_', '-' and '='")
        if not Path(resolve_location(entry["path"])).exists():
            raise InputError(f"{where}: fusion.members[{index}]", f"{entry['path']} does not exist",
                             "give the member's model folder or .safetensors file")
        members.append((entry["name"], entry["path"]))
    return members


def _check_fusion_names(runs: Sequence[SweepRun], options: Mapping[str, Any], where: str) -> None:
    """Member labels (fixed members, runs) are unique and not `base`; `export` names a member or a merge."""
    checkpoints = options["checkpoints"]
    labels = [name for name, _ in options["members"]] + [
        member_label(run, choice, checkpoints) for run in runs for choice in checkpoints]
    methods = [spec.name for spec in options["methods"]]
    for label in labels:
        if label == "base" or labels.count(label) > 1 or label in methods:
            raise InputError(f"{where}: fusion.members: {label}", "this name is taken (base, a run or a merge)",
                             "give the fixed member another name")
    if options["export"] is not None and options["export"] not in labels + methods + ["base"]:
        raise InputError(f"{where}: fusion.export: {options['export']}", "no such candidate",
                         f"name a merge ({', '.join(methods)}) or a member")


def plan_sweep(sweep_file: str | Path, config: str | None = None, output: str | None = None,
               extra_args: Sequence[str] = ()) -> SweepPlan:
    """Read and check a sweep (every run resolved through the CLI); writes nothing. InputError on bad input."""
    from codiemb_pl.workflows.fusion import check_metric

    where = str(sweep_file)
    content = read_sweep_file(sweep_file)
    base_config = config or content.get("config")
    if not base_config or not isinstance(base_config, str):
        raise InputError(where, "no base fit config", "pass --config BASE.yaml (or `config:` in the sweep file)")
    if not Path(base_config).is_file():
        raise InputError(base_config, "base fit config not found", "check the --config path")
    output = output or content.get("output") or f"runs/sweep_{Path(sweep_file).stem}"
    if not isinstance(output, str):
        raise InputError(f"{where}: output", "must be a folder path", "e.g. output: runs/sweep_policies")
    stray = [arg for arg in extra_args if arg.startswith("-") and not arg.startswith("--")]
    if stray:
        raise InputError("codiemb sweep", f"unknown option {stray[0]}", "fit overrides look like --section.key value")
    common = _overrides(content.get("overrides"), f"{where}: overrides")
    runs = expand_runs(content, where)
    options = _fusion_options(content.get("fusion"), where, len(runs))
    _check_fusion_names(runs, options, where)
    manifest = content.get("manifest") or {}
    if not isinstance(manifest, dict):
        raise InputError(f"{where}: manifest", "must be a mapping", "e.g. manifest: {purpose: bagging}")
    args = list(extra_args)
    resolved = resolve_run_config(base_config, args + override_args(common), f"{where}: overrides")
    if not _callbacks(resolved, EXPORT_CALLBACK):   # the export is a run's final output: add one when absent
        args += ["--trainer.callbacks+", EXPORT_CALLBACK]
        resolved = resolve_run_config(base_config, args + override_args(common), f"{where}: overrides")
    if options["evaluate"] and not (resolved.get("data") or {}).get("val"):
        raise InputError(f"{base_config}: data.val", "no validation sets: the sweep cannot score its members",
                         "add validation sets to the base config (or `data.val` under `overrides:`)")
    if options["evaluate"]:   # the metric must be one data.val will give, or no winner: checked before training
        check_metric(options["metric"], validation_tasks(resolved), f"{where}: fusion.metric")
    seed = options["seed"] if options["seed"] is not None else int(resolved.get("seed_everything") or 0)
    batch = options["eval_batch_size"] or int((resolved.get("data") or {}).get("val_batch_size") or 64)
    plan = SweepPlan(where, base_config, Path(output), args, common, runs, options["checkpoints"],
                     options["methods"], options["metric"], int(seed), int(batch), resolved,
                     base_model=options["base"] or str(resolved["model"]["model_name_or_path"]),
                     members=options["members"], export=options["export"], export_folder=options["export_folder"],
                     evaluate=options["evaluate"], manifest=dict(manifest))
    check_keys(common, resolved, f"{where}: overrides")
    for run in runs:
        run_where = f"{where}: run {run.name!r}"
        check_keys(run.overrides, resolved, run_where)
        run_args = plan.fit_args(run)[3:]   # without "fit --config BASE"
        plan.run_configs[run.name] = resolve_run_config(base_config, run_args, run_where)
        _check_run_config(plan, run, plan.run_configs[run.name], run_where)
        _check_record(plan, run, run_where)
    return plan


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------

def is_finished_export(folder: str | Path) -> bool:
    """A complete sentence-transformers export: modules.json and weights (exports are written atomically)."""
    folder = Path(folder)
    return (folder / "modules.json").is_file() and any(folder.glob("*.safetensors"))


def is_finished(plan: SweepPlan, run: SweepRun) -> bool:
    """The run's export is complete (written when fit ends) and, for snapshot choices, its fusion leaderboard."""
    folder = plan.run_folder(run)
    snapshots = any(choice != FINAL for choice in plan.checkpoints)
    return is_finished_export(folder / "model") and (
        not snapshots or (folder / "fusion" / "leaderboard.json").is_file())


def _read_record(plan: SweepPlan, run: SweepRun) -> dict[str, Any] | None:
    path = plan.run_folder(run) / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _same_settings(plan: SweepPlan, run: SweepRun, record: Mapping[str, Any]) -> bool:
    """The record's command is the run's, and so is its resolved config (an edited base config changes it
    but not the command; records written before configs were kept hold none)."""
    config = plan.run_configs.get(run.name)
    return record.get("command") == plan.fit_args(run) and (
        record.get("config") is None or config is None
        or normalise_paths(record["config"]) == json.loads(json.dumps(config)))  # paths moved in 0.2 still match


def _check_record(plan: SweepPlan, run: SweepRun, where: str) -> None:
    """A finished run made with another command or config would be reused silently: refuse it."""
    record = _read_record(plan, run)
    if record is not None and is_finished(plan, run) and not _same_settings(plan, run, record):
        raise InputError(where, f"{plan.run_folder(run)} holds a finished run made with a different configuration",
                         "rename the run, use another --output, or delete that run folder to retrain it")


@dataclass
class RunOutcome:
    """What became of one run: skipped (already finished), trained, interrupted, or failed (its error line)."""

    name: str
    status: str
    error: str = ""


class _Tee:
    """`stream` that also keeps a copy of what is written (to report a crashed run's error line)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):   # flush, fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def train_run(plan: SweepPlan, run: SweepRun, log: Callable[[str], None] = print) -> RunOutcome:
    """Fit one run in-process (skipped when finished; resumed from its last.ckpt when the settings match)."""
    from codiemb_pl.cli.main import main

    if is_finished(plan, run):
        return RunOutcome(run.name, "skipped")
    folder = plan.run_folder(run)
    args, last = plan.fit_args(run), folder / "checkpoints" / "last.ckpt"
    record = _read_record(plan, run)
    resume = last.is_file() and record is not None and _same_settings(plan, run, record)
    if last.is_file() and not resume:
        log(f"[codiemb sweep] {run.name}: {last} was made with other settings; training from the start")
    atomic_write_text(folder / RUN_RECORD, json.dumps({"name": run.name, "command": args,
                                                       "overrides": {**plan.common, **run.overrides},
                                                       "config": plan.run_configs.get(run.name)}, indent=2) + "\n")
    log(f"[codiemb sweep] {run.name}: " + ("resuming from " + str(last) if resume else "training") + "\n  "
        + plan.command_line(run))
    tee = _Tee(sys.stderr)
    error = ""
    try:
        with contextlib.redirect_stderr(tee):
            code = main(args + (["--ckpt_path", str(last)] if resume else []))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception as exc:  # a crash in one run must not stop the others
        code, error = 1, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if code == 0 and is_finished(plan, run):
        return RunOutcome(run.name, "trained")
    if code == 0 and last.is_file():   # SIGTERM / SIGINT: GracefulInterruption saved last.ckpt and ended fit
        return RunOutcome(run.name, "interrupted", f"stopped with {last} saved")
    if not error:
        lines = [line for line in tee.copy.getvalue().splitlines() if line.startswith(ERROR_PREFIX)]
        error = lines[-1].removeprefix(ERROR_PREFIX) if lines else f"exit code {code}, no finished export"
    return RunOutcome(run.name, "failed", error)


def train_runs(plan: SweepPlan, log: Callable[[str], None] = print) -> list[RunOutcome]:
    """Train every run one after another; a failed run is reported and the next one starts; an interrupted
    one (SIGTERM / SIGINT, its last.ckpt saved) stops the sweep there."""
    outcomes = []
    for index, run in enumerate(plan.runs, 1):
        outcome = train_run(plan, run, log)
        note = f": {outcome.error}" if outcome.error else ""
        log(f"[codiemb sweep] run {index}/{len(plan.runs)} {run.name}: {outcome.status}{note}")
        outcomes.append(outcome)
        if outcome.status == "interrupted":
            break
    return outcomes


def print_commands(plan: SweepPlan, stream=None) -> None:
    """One `codiemb fit ...` line per run (submit them as jobs, then `codiemb sweep --fuse-only`)."""
    for run in plan.runs:
        print(plan.command_line(run), file=stream or sys.stdout, flush=True)


# ----------------------------------------------------------------------------------------------------
# fusing
# ----------------------------------------------------------------------------------------------------

def snapshot_path(folder: Path, choice: str) -> Path:
    """The CheckpointFusion snapshot labelled `choice` in a run folder (found through its leaderboard.json)."""
    board_file = folder / "fusion" / "leaderboard.json"
    if not board_file.is_file():
        raise InputError(str(folder), f"has no fusion/leaderboard.json to find its {choice} snapshot in",
                         "let the run finish (its CheckpointFusion writes it when fit ends)")
    for candidate in json.loads(board_file.read_text(encoding="utf-8")).get("ranking", []):
        if candidate.get("kind") == "checkpoint" and choice in str(candidate.get("name", "")).split("+"):
            path = folder / "fusion" / "snapshots" / Path(candidate["weights_path"]).name
            if path.is_file():
                return path
    raise InputError(str(folder), f"kept no {choice} snapshot",
                     "choose a checkpoint its CheckpointFusion collected (see its fusion/leaderboard.json)")


def collect_members(plan: SweepPlan) -> list[tuple[str, Path]]:
    """(label, weights) of the fixed members, then of the chosen checkpoints of every run; InputError naming
    the first missing one."""
    members = [(name, Path(resolve_location(path))) for name, path in plan.members]
    for run in plan.runs:
        folder = plan.run_folder(run)
        if not is_finished(plan, run):
            raise InputError(f"run {run.name!r}", f"has not finished ({folder / 'model'} is missing or incomplete)",
                             f"run `{plan.command_line(run)}` or `codiemb sweep` without --fuse-only")
        for choice in plan.checkpoints:
            path = folder / "model" if choice == FINAL else snapshot_path(folder, choice)
            members.append((plan.member_label(run, choice), path))
    return members


def transformer_state(model_name_or_path: str) -> dict:
    """θ0 named as in an export: the transformer's state dict without pooler weights (`TextEncoder.save`)."""
    from codiemb_pl.model.encoder import TextEncoder

    state = TextEncoder(str(model_name_or_path)).model.state_dict()
    return {key: value for key, value in state.items() if not key.startswith("pooler.")}


def merge_record(method: str, base: str, models: Sequence[str | Path], weights: Sequence[float] | None = None,
                 **facts: Any) -> dict[str, Any]:
    """What an exported folder's merge.json says: the method, θ0, the members' paths, their weights, `facts`."""
    return {"method": method, "base": str(base), "models": [str(Path(resolve_location(str(p))).resolve()) for p in models],
            "weights": None if weights is None else list(weights), **facts}


def load_weights(encoder, location: str | Path) -> None:
    """Put the transformer weights of a model folder, `.safetensors` or `.ckpt` into `encoder` (all must fit)."""
    from codiemb_pl.fusion.keys import is_untrained_key
    from codiemb_pl.fusion.sources import open_checkpoint

    source = open_checkpoint(location).source
    state = {key: source.get(key) for key in source.keys() if not is_untrained_key(key)}
    result = encoder.model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise InputError(str(location), f"weights do not fit the sweep's model (missing {result.missing_keys[:3]})",
                         "fuse runs of the same base model")


def wandb_loggers(resolved: Mapping[str, Any], output: Path) -> list:
    """The base config's W&B loggers, instantiated for one sweep run (`sweep-<output folder>`)."""
    from lightning.pytorch.loggers import WandbLogger

    entries = (resolved.get("trainer") or {}).get("logger")
    loggers = []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict) or not entry.get("class_path"):
            continue
        module_name, _, class_name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        if issubclass(cls, WandbLogger):
            init_args = {**(entry.get("init_args") or {}), "name": f"sweep-{output.name}"}
            init_args.pop("version", None)
            loggers.append(cls(**init_args))
    return loggers


def fuse_sweep(plan: SweepPlan, log: Callable[[str], None] = print, show_progress: bool = True):
    """Merge the members (fixed ones, then the runs' chosen checkpoints) with every method against θ0, score
    base + members + merges on `data.val` (unless `fusion.evaluate` is false), write the leaderboard (JSON /
    markdown, W&B table) and export the winner (or `fusion.export`) to OUTPUT/<export_folder>."""
    from codiemb_pl.callbacks.monitoring import log_leaderboard
    from codiemb_pl.data.sources import SourceConfig
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.evaluation.suite import evaluate_encoder, flat_metrics
    from codiemb_pl.fusion.writer import save_state_dict
    from codiemb_pl.workflows.fusion import FusionInputs, run_fusion
    from codiemb_pl.data.eval_builders import build_eval_sets

    members = collect_members(plan)
    data = plan.resolved.get("data") or {}
    sets = build_eval_sets(data.get("val") or [], instruction_template=data.get("instruction_template"),
                                 passage_prefix=data.get("passage_prefix"), where="data.val") if plan.evaluate else []
    fusion_dir = plan.output / "fusion"
    base_file = fusion_dir / "base.safetensors"
    save_state_dict(transformer_state(plan.base_model), base_file)
    # the first run's export carries the runs' pooling, normalisation and length
    encoder = TextEncoder(str(plan.run_folder(plan.runs[0]) / "model"), include_prompt=False)

    def evaluate(path: Path) -> dict[str, float]:
        if not plan.evaluate:
            return {}
        load_weights(encoder, path)
        per_set, summary = evaluate_encoder(encoder, sets, batch_size=plan.eval_batch_size)
        return flat_metrics(per_set, summary)

    inputs = FusionInputs(
        base=base_file, checkpoints=members, model_folder=plan.base_model,
        probe_sources=[SourceConfig(**entry) for entry in data.get("train") or []],
        encoder_settings={"pooling": encoder.pooling, "normalize": encoder.normalize,
                          "max_seq_length": encoder.max_seq_length},
        seed=plan.seed)
    board = run_fusion(inputs, plan.methods, evaluate, fusion_dir / "candidates", plan.metric, log=log,
                       show_progress=show_progress)
    ranking = f"ranked by {board.metric}" if plan.evaluate else "not scored: fusion.evaluate is false"
    log(f"\nsweep leaderboard ({len(plan.runs)} runs, {ranking})\n{board.to_text()}")
    record = json.loads(board.to_json())
    record["sweep"] = {"file": plan.sweep_file, "config": plan.base_config, "base_model": plan.base_model,
                       "checkpoints": plan.checkpoints, "members": [{"name": name, "path": path}
                                                                    for name, path in plan.members],
                       "runs": [{"name": run.name, "overrides": {**plan.common, **run.overrides},
                                 "command": plan.command_line(run)} for run in plan.runs]}
    record.update({"manifest": plan.manifest} if plan.manifest else {})
    chosen = chosen_candidate(plan, board, log)
    if chosen is not None:
        folder = export_candidate(plan, board, inputs, encoder, chosen, log)
        record["exported"] = str(folder)
        score = f" ({board.metric} {chosen.metrics[board.metric]:.4f})" if board.metric in chosen.metrics else ""
        what = "the winner " if plan.export is None else ""
        untrained = " (the base model itself: see the note above)" if chosen.kind == "base" else ""
        log(f"[codiemb sweep] exported {what}{chosen.name}{score}{untrained} to {folder.resolve()}")
    else:
        log(f"[codiemb sweep] nothing exported: no candidate has a finite {board.metric} (see the leaderboard; "
            "check the validation sets)")
    atomic_write_text(plan.output / "leaderboard.md",
                      f"# Sweep leaderboard (by `{board.metric}`)\n\n" + board.to_markdown())
    atomic_write_text(plan.output / "leaderboard.json", json.dumps(record, indent=2, default=str) + "\n")
    loggers = wandb_loggers(plan.resolved, plan.output)
    if loggers:
        log_leaderboard(loggers, [{"rank": rank, "candidate": c.name, "kind": c.kind, **c.metrics}
                                  for rank, c in enumerate(board.ranked(), 1)], key="sweep/leaderboard")
        for logger in loggers:
            logger.experiment.finish()
    return board


def chosen_candidate(plan: SweepPlan, board, log: Callable[[str], None] = print):
    """The candidate to export: `fusion.export` by name, else the winner (None: nothing scored). A named merge
    that was skipped because it would give the only member back (`Leaderboard.skipped`) is that member."""
    if plan.export is None:
        return board.winner()
    if plan.export in board.skipped:
        member = next(c for c in board.candidates if c.kind == "checkpoint")
        log(f"[codiemb sweep] fusion.export {plan.export} was skipped ({board.skipped[plan.export]}): "
            f"exporting the member {member.name} itself")
        return member
    return next(c for c in board.candidates if c.name == plan.export)


def members_prompt_settings(plan: SweepPlan):
    """(prompt settings, notes) of the exported model: those of the fixed members and the runs' exports
    (`prompts.members_prompt_settings`: the first that declares prompts; a note names members that differ)."""
    from codiemb_pl.model.prompts import folder_prompt_settings, members_prompt_settings as first_declared

    folders = [(name, Path(resolve_location(path))) for name, path in plan.members]
    folders += [(run.name, plan.run_folder(run) / "model") for run in plan.runs]
    return first_declared([(name, folder_prompt_settings(folder) if folder.is_dir() else None)
                           for name, folder in folders])


def export_candidate(plan: SweepPlan, board, inputs, encoder, candidate, log: Callable[[str], None] = print) -> Path:
    """`candidate` as a sentence-transformers folder OUTPUT/<export_folder>, written atomically with its model
    card (README.md) and merge.json (`merge_record` + its name, scores and the sweep's `manifest`)."""
    from codiemb_pl.model.card import encoder_card_fields
    from codiemb_pl.model.prompts import apply_prompt_settings
    from codiemb_pl.workflows.fusion import winner_card

    folder = plan.output / plan.export_folder
    load_weights(encoder, candidate.weights_path)
    settings, notes = members_prompt_settings(plan)
    if settings is not None:   # scoring ran with include_prompt False; the folder takes the members' settings
        apply_prompt_settings(encoder, settings)
    for note in notes:
        log(f"[codiemb sweep] {note}")
    card = winner_card(board, inputs, candidate=candidate, model_path=str(folder), **encoder_card_fields(encoder))
    models = {"fused": [path for _, path in inputs.checkpoints], "checkpoint": [candidate.weights_path]}
    record = merge_record(candidate.method or candidate.kind, plan.base_model, models.get(candidate.kind, []),
                          candidate.weights, name=candidate.name, params=candidate.params, metric=board.metric,
                          metrics=candidate.metrics, **plan.manifest)
    with atomic_directory(folder) as staging:
        encoder.save(staging, model_card=card)
        atomic_write_text(staging / MERGE_MANIFEST, json.dumps(record, indent=2, default=str) + "\n")
    return folder


@dataclass
class SweepResult:
    """What `execute_sweep` did: the exit code (0: fused, or interrupted; 1: a run failed, or no candidate had a
    score to export), each run's outcome (none with `fuse_only`), the leaderboard and the exported folder (None
    when it did not fuse)."""

    code: int
    outcomes: list[RunOutcome] = field(default_factory=list)
    board: Any = None
    exported: Path | None = None


def execute_sweep(plan: SweepPlan, fuse_only: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    """Train (unless `fuse_only`), then fuse once every run has finished (see `run_sweep`)."""
    outcomes: list[RunOutcome] = []
    if not fuse_only:
        outcomes = train_runs(plan, log)
        if outcomes[-1].status == "interrupted":   # as `codiemb fit` does: a deliberate stop, exit code 0
            log("[codiemb sweep] interrupted: rerun the same command to resume (finished runs are skipped, "
                f"{outcomes[-1].name} resumes from its last.ckpt)")
            return SweepResult(0, outcomes)
        failed = [outcome for outcome in outcomes if outcome.status == "failed"]
        if failed:
            log(f"[codiemb sweep] {len(failed)} of {len(outcomes)} run(s) failed: "
                + "; ".join(f"{o.name}: {o.error}" for o in failed)
                + ". Fix them and rerun the same command: finished runs are skipped, fusion follows.")
            return SweepResult(1, outcomes)
    board = fuse_sweep(plan, log)
    exported = plan.output / plan.export_folder if plan.export is not None or board.winner() is not None else None
    return SweepResult(0 if exported is not None else 1, outcomes, board, exported)


def run_sweep(plan: SweepPlan, fuse_only: bool = False, log: Callable[[str], None] = print) -> int:
    """Train (unless `fuse_only`) and fuse; exit code 0 (also when interrupted), 1 when a run failed (fusion
    then waits until every run has finished) or nothing was exported."""
    return execute_sweep(plan, fuse_only, log).code
