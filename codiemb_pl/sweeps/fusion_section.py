"""The `fusion:` section of a sweep file, checked as far as the file alone allows (the metric against `data.val`
and the snapshots the runs keep are checked once the configs are resolved, `sweeps/config.py`).

`fusion_options(section, where, runs)` -> `FusionOptions`: the member checkpoints of every run (`final` or a
CheckpointFusion snapshot: last, best_ir, best_sts, best, epochN, stepN), the fixed members (`{name, path}`,
existing), the merge methods (`workflows.fusion.settings.parse_methods`, tried with the member count), the winner's
metric, seed, scoring batch size, θ0 (`base`), what to export and where, and whether to score at all.
`check_fusion_names` then checks that member labels are unique and that `export` names a candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location
from codiemb_pl.sweeps.schema import (
    DEFAULT_METHODS,
    FINAL,
    RESERVED_FOLDERS,
    RUN_NAME,
    SNAPSHOT_CHOICE,
    FusionSection,
    SweepRun,
    member_label,
    typed,
)
from codiemb_pl.workflows.fusion.settings import MethodSpec, parse_methods


@dataclass
class FusionOptions:
    """A checked `fusion:` section (defaults filled in)."""

    checkpoints: list[str]
    methods: list[MethodSpec]
    metric: str
    seed: Optional[int] = None
    eval_batch_size: Optional[int] = None
    base: Optional[str] = None
    members: list[tuple[str, str]] = field(default_factory=list)   # (label, location)
    export: Optional[str] = None
    export_folder: str = "model"
    evaluate: bool = True


def fusion_options(section: Any, where: str, runs: int = 1) -> FusionOptions:
    """The checked `fusion:` section of a sweep with `runs` runs (methods are tried with the member count)."""
    if section is not None and not isinstance(section, Mapping):
        raise InputError(f"{where}: fusion", "must be a mapping", "e.g. fusion: {methods: [multi_slerp]}")
    typed_section: FusionSection = typed(FusionSection, dict(section or {}), where, prefix="fusion.")
    checkpoints = typed_section.checkpoints
    checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    if not checkpoints:
        raise InputError(f"{where}: fusion.checkpoints", "must be a non-empty list", "e.g. [final, best_ir, best_sts]")
    for choice in checkpoints:
        if choice != FINAL and not SNAPSHOT_CHOICE.match(str(choice)):
            raise InputError(f"{where}: fusion.checkpoints: {choice}", "unknown checkpoint",
                             "use final (the run's export) or a CheckpointFusion snapshot: last, best_ir, "
                             "best_sts, best, epochN, stepN")
    if len(set(checkpoints)) != len(checkpoints):
        raise InputError(f"{where}: fusion.checkpoints", "a checkpoint is named twice", "name each once")
    members = fixed_members(typed_section.members, where)
    methods = parse_methods(DEFAULT_METHODS if typed_section.methods is None else typed_section.methods,
                            f"{where}: fusion.methods", members=len(members) + runs * len(checkpoints))
    if not methods:
        raise InputError(f"{where}: fusion.methods", "no merge methods", "list at least one, e.g. [delta_guided]")
    evaluate, export = typed_section.evaluate, typed_section.export
    if not evaluate and export is None:
        raise InputError(f"{where}: fusion.evaluate", "without scores there is no winner to export",
                         "name the candidate to export, e.g. export: multi_slerp")
    if not evaluate and any(spec.method == "greedy_soup" for spec in methods):
        raise InputError(f"{where}: fusion.methods", "greedy_soup needs scores but fusion.evaluate is false",
                         "remove greedy_soup or set evaluate: true")
    folder = typed_section.export_folder
    if not isinstance(folder, str) or not RUN_NAME.match(folder) or folder in RESERVED_FOLDERS:
        raise InputError(f"{where}: fusion.export_folder", f"{folder!r} is not a folder name the sweep leaves free",
                         f"use a plain name other than {' or '.join(RESERVED_FOLDERS)}, e.g. model")
    base = typed_section.base
    if base is not None and not Path(resolve_location(base)).exists():
        raise InputError(f"{where}: fusion.base", f"{base!r} is not an existing model folder",
                         "name θ0's folder (default: model.model_name_or_path)")
    return FusionOptions([str(c) for c in checkpoints], methods, typed_section.metric, typed_section.seed,
                         typed_section.eval_batch_size, base, members, export, folder, evaluate)


def fixed_members(entries: Optional[list[Any]], where: str) -> list[tuple[str, str]]:
    """`fusion.members`: [{name, path}] of models (folders, .safetensors) merged with the runs' checkpoints."""
    members = []
    for index, entry in enumerate(entries or []):
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


def check_fusion_names(runs: Sequence[SweepRun], options: FusionOptions, where: str) -> None:
    """Member labels (fixed members, runs) are unique and not `base`; `export` names a member or a merge."""
    labels = [name for name, _ in options.members] + [
        member_label(run, choice, options.checkpoints) for run in runs for choice in options.checkpoints]
    methods = [spec.name for spec in options.methods]
    for label in labels:
        if label == "base" or labels.count(label) > 1 or label in methods:
            raise InputError(f"{where}: fusion.members: {label}", "this name is taken (base, a run or a merge)",
                             "give the fixed member another name")
    if options.export is not None and options.export not in labels + methods + ["base"]:
        raise InputError(f"{where}: fusion.export: {options.export}", "no such candidate",
                         f"name a merge ({', '.join(methods)}) or a member")
