"""Sweeps: train K runs of one base config with different settings, then fuse them across trajectories.

    plan = plan_sweep("configs/sweeps/policies.yaml", config="configs/quickstart.yaml", output="runs/sweep")
    result = execute_sweep(plan)     # each run: run_fit(its resolved config) in this process, in OUTPUT/runs/NAME;
                                     # then members + merges scored, leaderboard.json, OUTPUT/model

A sweep walks: schema (`sweeps/schema.py`, `fusion_section.py`: the file checked) -> config (`config.py`: every
run's config resolved through `codiemb fit`'s parser, built once, and checked) -> runs (`runs.py`: `run_fit` in
process; skipped / resumed / crashed, `records.py`) -> members -> `workflows.fusion.export.fuse_and_export` ->
leaderboard (`leaderboard.py`). Nothing goes through printed text. A sweep file (YAML) names the runs as
config overrides (dotted keys, as `codiemb fit --print_config` shows them) and how to fuse them:

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
      methods: [...]                         # as CheckpointFusion.methods (default: schema.DEFAULT_METHODS)
      metric: val/avg                        # picks the winner (higher is better)
      seed: 0                                # DARE / Self Positioning (default: seed_everything)
      base: PATH                             # θ0 of the merges (default: model.model_name_or_path)
      members: [{name: old, path: PATH}]     # fixed models merged with the runs (listed first)
      export: multi_slerp                    # export this candidate instead of the winner
      export_folder: model                   # OUTPUT/<export_folder> (default: model)
      evaluate: true                         # false: merge without scoring (needs `export`, no greedy_soup)
    manifest: {...}                          # facts recorded in leaderboard.json and the export's merge.json

Everything is checked before anything is written. A finished run (its export complete and its record,
`sweep_run.json`, marked finished once its fit returned) is skipped; one with checkpoints resumes from the newest
complete one (`ckpt_path="last"`), also when a kill cut its fit short after the export; a crashed run is
reported and the rest continue (fusion waits until every run has finished); SIGTERM / SIGINT stops the sweep
after the current run saved its last.ckpt (exit code 0, as `codiemb fit`). `codiemb boom` is such a sweep
(`sweeps.boom` plans it). The temporaries a killed sweep left beside its export and leaderboards, in
OUTPUT/fusion and beside each run's record are removed when it runs again (`remove_stale_sweep_temporaries`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.storage.atomic import remove_stale_temporaries
from codiemb_pl.sweeps.config import SweepPlan
from codiemb_pl.sweeps.leaderboard import fuse_sweep
from codiemb_pl.sweeps.records import RUN_RECORD
from codiemb_pl.sweeps.runs import FAILED, INTERRUPTED, RunOutcome, train_runs


@dataclass
class SweepResult:
    """What `execute_sweep` did: the exit code (0: fused, or interrupted; 1: a run failed, or no candidate had a
    score to export), each run's outcome (none with `fuse_only`), the leaderboard and the exported folder (None
    when it did not fuse)."""

    code: int
    outcomes: list[RunOutcome] = field(default_factory=list)
    board: Any = None
    exported: Optional[Path] = None


def remove_stale_sweep_temporaries(plan: SweepPlan) -> list[Path]:
    """Delete the temporaries a killed sweep left where it alone writes: beside its export and leaderboards in
    OUTPUT, in OUTPUT/fusion, and beside each run's record (`sweep_run.json`; the rest of a run folder is its
    fit's, which cleans it). Call it under the sweep's lock."""
    fusion = plan.output / "fusion"
    records = [path for run in plan.runs for path in remove_stale_temporaries(plan.run_folder(run), {RUN_RECORD})]
    return (remove_stale_temporaries(plan.output, {plan.export_folder, "leaderboard.json", "leaderboard.md"})
            + remove_stale_temporaries(fusion) + remove_stale_temporaries(fusion / "candidates") + records)


def execute_sweep(plan: SweepPlan, fuse_only: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    """Train (unless `fuse_only`), then fuse once every run has finished. Call it under the sweep's lock: it
    first removes the temporaries a killed sweep left (`remove_stale_sweep_temporaries`)."""
    removed = remove_stale_sweep_temporaries(plan)
    if removed:
        log(f"[codiemb sweep] removed {len(removed)} temporary file(s)/folder(s) an interrupted sweep left: "
            + ", ".join(str(path) for path in removed))
    outcomes: list[RunOutcome] = []
    if not fuse_only:
        outcomes = train_runs(plan, log)
        if outcomes[-1].status == INTERRUPTED:   # as `codiemb fit` does: a deliberate stop, exit code 0
            log("[codiemb sweep] interrupted: rerun the same command to resume (finished runs are skipped, "
                f"{outcomes[-1].name} resumes from its last.ckpt)")
            return SweepResult(0, outcomes)
        failed = [outcome for outcome in outcomes if outcome.status == FAILED]
        if failed:
            log(f"[codiemb sweep] {len(failed)} of {len(outcomes)} run(s) failed: "
                + "; ".join(f"{o.name}: {o.error}" for o in failed)
                + ". Fix them and rerun the same command: finished runs are skipped, fusion follows.")
            return SweepResult(1, outcomes)
    fused = fuse_sweep(plan, log)
    return SweepResult(0 if fused.exported is not None else 1, outcomes, fused.board, fused.exported)


def run_sweep(plan: SweepPlan, fuse_only: bool = False, log: Callable[[str], None] = print) -> int:
    """Train (unless `fuse_only`) and fuse; exit code 0 (also when interrupted), 1 when a run failed (fusion
    then waits until every run has finished) or nothing was exported."""
    return execute_sweep(plan, fuse_only, log).code
