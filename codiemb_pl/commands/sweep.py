"""`codiemb sweep`: train several runs of one config (a sweep file of overrides) and fuse them.

    codiemb sweep --config BASE.yaml --sweep SWEEP.yaml [--output DIR] [fit overrides for every run]
    codiemb sweep ... --print-commands     # one `codiemb fit ...` line per run (submit them as jobs), then
    codiemb sweep ... --fuse-only          # fuse the finished runs without training

Runs go to DIR/runs/NAME (finished ones are skipped, an interrupted one resumes from its newest
checkpoint, a crashed one is reported and the others continue); the leaderboard of base, members and merges goes to
DIR/leaderboard.json / .md and the winner to DIR/model. The sweep file format and the work are in
`codiemb_pl.sweeps` (`sweep.py` walks them); this module parses and holds DIR's run lock
(`codiemb_pl.storage.run_lock`) while the sweep trains and fuses (its in-process fits nest under it).
"""

from __future__ import annotations

import argparse

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument

COMMAND = "codiemb sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=COMMAND, allow_abbrev=False,
                           description="Train the runs of a sweep file one after another, then fuse them "
                                       "across trajectories; unknown --section.key flags go to every run.")
    parser.add_argument("--config", help="base fit config (default: the sweep file's `config`)")
    parser.add_argument("--sweep", required=True, help="sweep file: runs (overrides) or a grid, and fusion options")
    parser.add_argument("--output", help="output folder (default: the sweep file's `output`, else runs/sweep_NAME)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="print one `codiemb fit` command line per run and stop (nothing is written)")
    mode.add_argument("--fuse-only", action="store_true", help="do not train: fuse the runs already finished")
    add_trust_checkpoint_argument(parser)
    return parser


@register_command("sweep")
def sweep_command(argv: list[str]) -> int:
    """Plan (everything checked first), then print the commands, or train and fuse."""
    args, fit_overrides = build_parser().parse_known_args(argv)   # before the heavy imports: `--help` stays fast
    from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
    from codiemb_pl.storage.run_lock import run_lock
    from codiemb_pl.sweeps.config import plan_sweep
    from codiemb_pl.sweeps.runs import print_commands
    from codiemb_pl.sweeps.sweep import run_sweep

    plan = plan_sweep(args.sweep, config=args.config, output=args.output, extra_args=fit_overrides)
    if args.print_commands:
        print_commands(plan)
        return 0
    with run_lock(plan.output, "sweep", tree=True, folder_option="--output"), \
            trusted_checkpoints(bool(args.trust_checkpoint)):   # its runs' fits nest under the lock; members, resumes
        return run_sweep(plan, fuse_only=args.fuse_only, log=lambda line: print(line, flush=True))
