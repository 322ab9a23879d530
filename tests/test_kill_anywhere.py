"""Kill anywhere (issue 27, item 2): three seeded trials of `benchmarks/kill_anywhere.py`, one per entry point.

Each SIGKILLs a real `codiemb` process (a forked child of this one, in its own process group; fit: inside a
save; fuse: at a seeded time; sweep: inside a save in its second run or its fusion), then runs the harness's
own checks: every final artefact absent or complete and loadable, nothing set aside and lost, the same command
again exits 0 and takes over the dead run's lock, nothing left behind, and the results equal the uninterrupted
run's (weights tensor by tensor, exactly; the sweep's reference is left to the harness, it would double the
time). A fit of 2 steps (a checkpoint after each) keeps them short.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kill_anywhere  # noqa: E402

SEED = 21
DRAW = random.Random(SEED)
PLANS = {   # seeded moments: the k-th temporary the run shows (fit: 13 in all; sweep: ~39), or seconds
    "fit": kill_anywhere.KillPlan("save", save_index=DRAW.randint(3, 12)),
    "fuse": kill_anywhere.KillPlan("uniform", at_seconds=DRAW.uniform(0.3, 1.5)),
    "sweep": kill_anywhere.KillPlan("save", save_index=DRAW.randint(15, 35)),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    return kill_anywhere.prepare_workspace(tmp_path_factory.mktemp("kill_anywhere"), model=tiny_model_dir, steps=2,
                                           start="fork", fsync_stretch=0.0)


@pytest.mark.parametrize("entry", ["fit", "fuse", "sweep"])
def test_a_killed_run_leaves_complete_artefacts_and_the_same_command_finishes_it(workspace, entry):
    trial = kill_anywhere.run_trial(workspace, entry, index=0, seed=SEED, plan=PLANS[entry], compare=entry != "sweep")
    line = kill_anywhere.trial_line(trial)
    print(line)
    assert trial.killed, line
    assert trial.inside_save or PLANS[entry].mode == "uniform", line
    assert trial.rerun_code == 0 and not trial.failures, line
