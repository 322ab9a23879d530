"""A sweep's configs: the base config and every run's config resolved through `codiemb fit`'s own parser (built
once per sweep, `cli.fit.FitConfigParser`), then checked against the sweep, writing nothing.

`plan_sweep(sweep_file, config, output, extra_args) -> SweepPlan` reads the file (`schema`, `fusion_section`),
resolves base + command-line flags + `overrides` (adding an ExportEncoder when the base config has none: a
run's export is its final output), and then each run. Checks: every override key names a config entry
(nearest key suggested), the CLI accepts every value, callback folders follow each run's root, every run starts
from the sweep's θ0, `fusion.metric` and each run's `CheckpointFusion.metric` are metrics `data.val` gives, the
snapshots the fusion takes are collected, and a finished run folder was made with these settings
(`records.same_settings`). `SweepPlan.fit_args(run)` is the run's `codiemb fit` command line.
"""

from __future__ import annotations

import difflib
import importlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.cli.fit import FitConfigParser
from codiemb_pl.cli.run_folder import is_subclass_path
from codiemb_pl.errors import InputError
from codiemb_pl.sweeps.fusion_section import FusionOptions, check_fusion_names, fusion_options
from codiemb_pl.sweeps.overrides import check_overrides, override_args
from codiemb_pl.sweeps.records import is_finished_export, read_record, record_says_unfinished, same_settings
from codiemb_pl.sweeps.schema import EXPORT_FOLDER, FINAL, SweepRun, expand_runs, member_label, read_sweep_file
from codiemb_pl.workflows.fusion.settings import MethodSpec, check_metric

EXPORT_CALLBACK = "codiemb_pl.callbacks.ExportEncoder"
FUSION_CALLBACK = "codiemb_pl.callbacks.CheckpointFusion"
CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"


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
    methods: list[MethodSpec]
    metric: str
    seed: int
    eval_batch_size: int
    resolved: dict[str, Any]                  # base + command line + common overrides, resolved
    run_configs: dict[str, dict[str, Any]] = field(default_factory=dict)   # run name -> resolved config
    base_model: str = ""                      # θ0 of the merges (fusion.base; default model.model_name_or_path)
    members: list[tuple[str, str]] = field(default_factory=list)   # fusion.members: (label, location)
    export: Optional[str] = None              # candidate to export (None: the winner)
    export_folder: str = EXPORT_FOLDER
    evaluate: bool = True                     # score base, members and merges on data.val
    manifest: dict[str, Any] = field(default_factory=dict)   # recorded in leaderboard.json and merge.json
    parser: FitConfigParser = field(default_factory=FitConfigParser)   # the one fit parser of this sweep

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

    def has_outputs(self, run: SweepRun) -> bool:
        """The run's export is complete and, for snapshot choices, its fusion leaderboard is written."""
        folder = self.run_folder(run)
        snapshots = any(choice != FINAL for choice in self.checkpoints)
        return is_finished_export(folder / "model") and (
            not snapshots or (folder / "fusion" / "leaderboard.json").is_file())

    def is_finished(self, run: SweepRun) -> bool:
        """`has_outputs`, and the run's record does not say its fit is unfinished (`records.record_says_unfinished`:
        the export is written before the fit ends, its fusion and last validation follow)."""
        return self.has_outputs(run) and not record_says_unfinished(self.run_folder(run))

    def same_settings(self, run: SweepRun, record: Mapping[str, Any]) -> bool:
        """`record` (a run folder's sweep_run.json) was made with this run's command and config."""
        return same_settings(record, self.fit_args(run), self.run_configs.get(run.name), self.parser)


def resolve_run_config(parser: FitConfigParser, base_config: str, args: Sequence[str], where: str) -> dict[str, Any]:
    """The resolved fit config of `codiemb fit --config BASE ARGS`; its one error line, placed in the sweep file."""
    try:
        return parser.resolve(["--config", base_config, *args])
    except InputError as error:
        raise InputError(where, f"the fit configuration does not resolve: {error}",
                         "fix that value in the sweep file") from None


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


def callbacks_of(resolved: Mapping[str, Any], class_path: str) -> list[dict[str, Any]]:
    """The resolved `trainer.callbacks` entries of `class_path` or a subclass of it."""
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    entries = (resolved.get("trainer") or {}).get("callbacks") or []
    return [entry for entry in entries if isinstance(entry, dict) and is_subclass_path(entry.get("class_path"), cls)]


def validation_tasks(resolved: Mapping[str, Any]) -> dict[str, str]:
    """{set name: task} of a resolved fit config's `data.val` (what fusion scores candidates on)."""
    entries = (resolved.get("data") or {}).get("val") or []
    return {str(entry.get("name")): str(entry.get("task")) for entry in entries if isinstance(entry, Mapping)}


def trained_dims(resolved: Mapping[str, Any]) -> list[int]:
    """A resolved fit config's `model.matryoshka_dims` (the widths fusion metrics may name as `metric@m`)."""
    return [int(d) for d in (resolved.get("model") or {}).get("matryoshka_dims") or []]


def check_run_config(plan: SweepPlan, run: SweepRun, resolved: Mapping[str, Any], where: str) -> None:
    """Folders inside the run's root; the same θ0 as the sweep; a CheckpointFusion metric its data.val gives;
    the snapshots the fusion needs are collected."""
    root = plan.run_folder(run).resolve()
    for class_path in (EXPORT_CALLBACK, FUSION_CALLBACK, CHECKPOINT_CALLBACK):
        for entry in callbacks_of(resolved, class_path):
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
    fusions = callbacks_of(resolved, FUSION_CALLBACK)
    for entry in fusions:   # the run's own CheckpointFusion would otherwise find out after training
        metric = (entry.get("init_args") or {}).get("metric")
        if metric is not None:
            check_metric(metric, validation_tasks(resolved), f"{where}: CheckpointFusion.metric",
                         dims=trained_dims(resolved))
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


def check_record(plan: SweepPlan, run: SweepRun, where: str) -> None:
    """A finished run made with another command or config would be reused silently: refuse it."""
    record = read_record(plan.run_folder(run))
    if record is not None and plan.is_finished(run) and not plan.same_settings(run, record):
        raise InputError(where, f"{plan.run_folder(run)} holds a finished run made with a different configuration",
                         "rename the run, use another --output, or delete that run folder to retrain it")


def plan_sweep(sweep_file: str | Path, config: Optional[str] = None, output: Optional[str] = None,
               extra_args: Sequence[str] = (), parser: Optional[FitConfigParser] = None) -> SweepPlan:
    """Read and check a sweep (every run resolved through `parser`, default a new one: one parser build per
    sweep); writes nothing. InputError on bad input."""
    where = str(sweep_file)
    content = read_sweep_file(sweep_file)
    base_config = config or content.config
    if not base_config:
        raise InputError(where, "no base fit config", "pass --config BASE.yaml (or `config:` in the sweep file)")
    if not Path(base_config).is_file():
        raise InputError(base_config, "base fit config not found", "check the --config path")
    output = output or content.output or f"runs/sweep_{Path(sweep_file).stem}"
    stray = [arg for arg in extra_args if arg.startswith("-") and not arg.startswith("--")]
    if stray:
        raise InputError("codiemb sweep", f"unknown option {stray[0]}", "fit overrides look like --section.key value")
    common = check_overrides(content.overrides, f"{where}: overrides")
    runs = expand_runs(content, where)
    options: FusionOptions = fusion_options(content.fusion, where, len(runs))
    check_fusion_names(runs, options, where)
    parser, args = parser or FitConfigParser(), list(extra_args)
    resolved = resolve_run_config(parser, base_config, args + override_args(common), f"{where}: overrides")
    if not callbacks_of(resolved, EXPORT_CALLBACK):   # the export is a run's final output: add one when absent
        args += ["--trainer.callbacks+", EXPORT_CALLBACK]
        resolved = resolve_run_config(parser, base_config, args + override_args(common), f"{where}: overrides")
    if options.evaluate and not (resolved.get("data") or {}).get("val"):
        raise InputError(f"{base_config}: data.val", "no validation sets: the sweep cannot score its members",
                         "add validation sets to the base config (or `data.val` under `overrides:`)")
    if options.evaluate:   # the metric must be one data.val will give, or no winner: checked before training
        check_metric(options.metric, validation_tasks(resolved), f"{where}: fusion.metric", dims=trained_dims(resolved))
    seed = options.seed if options.seed is not None else int(resolved.get("seed_everything") or 0)
    batch = options.eval_batch_size or int((resolved.get("data") or {}).get("val_batch_size") or 64)
    plan = SweepPlan(where, base_config, Path(output), args, common, runs, options.checkpoints, options.methods,
                     options.metric, int(seed), int(batch), resolved,
                     base_model=options.base or str(resolved["model"]["model_name_or_path"]),
                     members=options.members, export=options.export, export_folder=options.export_folder,
                     evaluate=options.evaluate, manifest=dict(content.manifest or {}), parser=parser)
    check_keys(common, resolved, f"{where}: overrides")
    for run in runs:
        run_where = f"{where}: run {run.name!r}"
        check_keys(run.overrides, resolved, run_where)
        plan.run_configs[run.name] = resolve_run_config(parser, base_config, plan.fit_args(run)[3:], run_where)
        check_run_config(plan, run, plan.run_configs[run.name], run_where)
        check_record(plan, run, run_where)
    return plan
