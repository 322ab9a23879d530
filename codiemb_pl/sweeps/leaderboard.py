"""A sweep's cross-run leaderboard: the members (fixed ones, then each run's chosen checkpoints), merged and
scored against θ0 through `workflows.fusion.export.fuse_and_export` (the path `CheckpointFusion` takes within one run),
then written to `OUTPUT/leaderboard.json` / `.md` (with the runs, their overrides and commands, the manifest and
the exported folder) and, when the base config has a WandbLogger, logged as a `sweep/leaderboard` W&B table.

θ0 = `fusion.base` or `model.model_name_or_path`, written as `OUTPUT/fusion/base.safetensors`; candidates go to
`OUTPUT/fusion/candidates`; scoring uses the first run's export (the runs' pooling, normalisation and length)
on `data.val`; the chosen candidate (the winner, or `fusion.export`) goes to `OUTPUT/<export_folder>` with its
model card, the runs' prompt settings and `merge.json`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from codiemb_pl.callbacks.monitoring import log_leaderboard
from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location
from codiemb_pl.sweeps.config import SweepPlan
from codiemb_pl.sweeps.schema import FINAL
from codiemb_pl.workflows.fusion.export import FusionOutcome, fuse_and_export
from codiemb_pl.workflows.fusion.leaderboard import write_leaderboard
from codiemb_pl.workflows.fusion.scoring import FusionInputs


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
        if not plan.is_finished(run):
            raise InputError(f"run {run.name!r}", f"has not finished ({folder / 'model'} is missing or incomplete)",
                             f"run `{plan.command_line(run)}` or `codiemb sweep` without --fuse-only")
        for choice in plan.checkpoints:
            path = folder / "model" if choice == FINAL else snapshot_path(folder, choice)
            members.append((plan.member_label(run, choice), path))
    return members


def wandb_loggers_of(resolved: Mapping[str, Any], name: str) -> list:
    """The base config's W&B loggers, instantiated for the sweep's own W&B run `name` (no other logger is built)."""
    from lightning.pytorch.loggers import WandbLogger

    entries = (resolved.get("trainer") or {}).get("logger")
    loggers = []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict) or not entry.get("class_path"):
            continue
        module_name, _, class_name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        if issubclass(cls, WandbLogger):
            init_args = {**(entry.get("init_args") or {}), "name": name}
            init_args.pop("version", None)
            loggers.append(cls(**init_args))
    return loggers


def fuse_sweep(plan: SweepPlan, log: Callable[[str], None] = print, show_progress: bool = True) -> FusionOutcome:
    """Merge the members (fixed ones, then the runs' chosen checkpoints) with every method against θ0, score
    base + members + merges on `data.val` (unless `fusion.evaluate` is false), export the winner (or
    `fusion.export`) to OUTPUT/<export_folder> and write the leaderboard (JSON / markdown, W&B table)."""
    from codiemb_pl.data.eval_builders import build_eval_sets
    from codiemb_pl.data.sources import SourceConfig
    from codiemb_pl.fusion.writer import save_state_dict
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.workflows.encoders import transformer_state

    members = collect_members(plan)
    data = plan.resolved.get("data") or {}
    sets = build_eval_sets(data.get("val") or [], instruction_template=data.get("instruction_template"),
                                 passage_prefix=data.get("passage_prefix"), where="data.val") if plan.evaluate else []
    base_file = plan.output / "fusion" / "base.safetensors"
    save_state_dict(transformer_state(plan.base_model), base_file)
    # the first run's export carries the runs' pooling, normalisation and length
    encoder = TextEncoder(str(plan.run_folder(plan.runs[0]) / "model"), include_prompt=False)
    inputs = FusionInputs(
        base=base_file, checkpoints=members, model_folder=plan.base_model,
        probe_sources=[SourceConfig(**entry) for entry in data.get("train") or []],
        encoder_settings={"pooling": encoder.pooling, "normalize": encoder.normalize,
                          "max_seq_length": encoder.max_seq_length},
        seed=plan.seed)
    ranking = f"ranked by {plan.metric}" if plan.evaluate else "not scored: fusion.evaluate is false"
    prompt_folders = [(name, Path(resolve_location(path))) for name, path in plan.members]
    prompt_folders += [(run.name, plan.run_folder(run) / "model") for run in plan.runs]
    outcome = fuse_and_export(inputs, plan.methods, encoder, sets=sets, eval_batch_size=plan.eval_batch_size,
                              metric=plan.metric, workdir=plan.output / "fusion" / "candidates",
                              heading=f"sweep leaderboard ({len(plan.runs)} runs, {ranking})",
                              export_folder=plan.output / plan.export_folder, export=plan.export,
                              merge_facts=plan.manifest, prompt_folders=prompt_folders, log=log,
                              prefix="[codiemb sweep]", show_progress=show_progress)
    report_export(plan, outcome, log)
    write_leaderboard(plan.output, outcome.board, "Sweep leaderboard", sweep_record(plan, outcome))
    loggers = wandb_loggers_of(plan.resolved, f"sweep-{plan.output.name}")
    if loggers:
        log_leaderboard(loggers, outcome.board.table_rows(), key="sweep/leaderboard")
        for logger in loggers:
            logger.experiment.finish()
    return outcome


def report_export(plan: SweepPlan, outcome: FusionOutcome, log: Callable[[str], None]) -> None:
    """The line saying what was exported where (or that nothing had a score to export)."""
    chosen, board = outcome.chosen, outcome.board
    if outcome.exported is None:
        log(f"[codiemb sweep] nothing exported: no candidate has a finite {board.metric} (see the leaderboard; "
            "check the validation sets)")
        return
    score = f" ({board.metric} {chosen.metrics[board.metric]:.4f})" if board.metric in chosen.metrics else ""
    what = "the winner " if plan.export is None else ""
    untrained = " (the base model itself: see the note above)" if chosen.kind == "base" else ""
    log(f"[codiemb sweep] exported {what}{chosen.name}{score}{untrained} to {outcome.exported.resolve()}")


def sweep_record(plan: SweepPlan, outcome: FusionOutcome) -> dict[str, Any]:
    """What leaderboard.json says beyond the board: the sweep (runs, overrides, commands), manifest, export."""
    record: dict[str, Any] = {"sweep": {
        "file": plan.sweep_file, "config": plan.base_config, "base_model": plan.base_model,
        "checkpoints": plan.checkpoints, "members": [{"name": name, "path": path} for name, path in plan.members],
        "runs": [{"name": run.name, "overrides": {**plan.common, **run.overrides}, "command": plan.command_line(run)}
                 for run in plan.runs]}}
    if plan.manifest:
        record["manifest"] = plan.manifest
    if outcome.exported is not None:
        record["exported"] = str(outcome.exported)
    return record
