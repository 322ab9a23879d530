"""A sweep's runs, one after another, each a `run_fit` in this process (`cli.fit`), under the sweep's run lock.

A finished run (`SweepPlan.is_finished`: its export complete and its fit returned) is skipped; one with
checkpoints made with the same settings (`SweepPlan.same_settings`) resumes from the newest complete one
(`ckpt_path="last"`, `training.resume`: also when a kill left `last.ckpt` older than a step checkpoint, or cut
the fit short after its export); otherwise it trains from the start. Before it trains, `sweep_run.json` records
its command and resolved config with `finished: false`, set to true once its fit has returned with its outputs
complete. `run_fit`'s result says how it ended: finished (trained, when its export is complete), interrupted
(SIGTERM / SIGINT: `last.ckpt` saved; the sweep stops there, as `codiemb fit` does, and the same command resumes
it), or an exception: `InputError` or any crash is the run's failure, reported with its one line while the next
run starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from codiemb_pl.cli.fit import run_fit
from codiemb_pl.errors import InputError
from codiemb_pl.sweeps.config import SweepPlan
from codiemb_pl.sweeps.records import read_record, run_checkpoints, write_record
from codiemb_pl.sweeps.schema import SweepRun

SKIPPED, TRAINED, INTERRUPTED, FAILED = "skipped", "trained", "interrupted", "failed"


@dataclass
class RunOutcome:
    """What became of one run: skipped (already finished), trained, interrupted, or failed (its error line)."""

    name: str
    status: str
    error: str = ""


def train_run(plan: SweepPlan, run: SweepRun, log: Callable[[str], None] = print) -> RunOutcome:
    """Fit one run in-process (skipped when finished; resumed from its newest complete checkpoint when the
    settings match). Its record says `finished: false` until the fit has returned with its outputs complete."""
    if plan.is_finished(run):
        return RunOutcome(run.name, SKIPPED)
    folder = plan.run_folder(run)
    last = folder / "checkpoints" / "last.ckpt"
    record = read_record(folder)
    checkpoints = run_checkpoints(folder)
    resume = bool(checkpoints) and record is not None and plan.same_settings(run, record)
    if checkpoints and not resume:
        log(f"[codiemb sweep] {run.name}: the checkpoints in {folder} were made with other settings; training "
            "from the start")
    recorded = (folder, run.name, plan.fit_args(run), {**plan.common, **run.overrides}, plan.run_configs.get(run.name))
    write_record(*recorded, finished=False)
    log(f"[codiemb sweep] {run.name}: " + (f"resuming from the newest complete checkpoint in {folder}" if resume
                                           else "training") + "\n  " + plan.command_line(run))
    try:
        result = run_fit(plan.run_configs[run.name], ckpt_path="last" if resume else None, parser=plan.parser)
    except InputError as error:   # bad input met during the fit (e.g. a data file): this run failed, the rest go on
        return RunOutcome(run.name, FAILED, str(error))
    except Exception as error:  # a crash in one run must not stop the others
        return RunOutcome(run.name, FAILED, f"{type(error).__name__}: {' '.join(str(error).split())}")
    if not result.finished:
        return RunOutcome(run.name, INTERRUPTED, f"stopped with {last} saved")
    if plan.has_outputs(run):
        write_record(*recorded, finished=True)
        return RunOutcome(run.name, TRAINED)
    return RunOutcome(run.name, FAILED, f"fit finished without a complete export in {folder / 'model'}")


def train_runs(plan: SweepPlan, log: Callable[[str], None] = print) -> list[RunOutcome]:
    """Train every run one after another; a failed run is reported and the next one starts; an interrupted
    one (SIGTERM / SIGINT, its last.ckpt saved) stops the sweep there."""
    outcomes = []
    for index, run in enumerate(plan.runs, 1):
        outcome = train_run(plan, run, log)
        note = f": {outcome.error}" if outcome.error else ""
        log(f"[codiemb sweep] run {index}/{len(plan.runs)} {run.name}: {outcome.status}{note}")
        outcomes.append(outcome)
        if outcome.status == INTERRUPTED:
            break
    return outcomes


def print_commands(plan: SweepPlan, stream=None) -> None:
    """One `codiemb fit ...` line per run (submit them as jobs, then `codiemb sweep --fuse-only`)."""
    for run in plan.runs:
        print(plan.command_line(run), file=stream or sys.stdout, flush=True)
