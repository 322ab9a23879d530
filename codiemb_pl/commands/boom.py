"""`codiemb boom`: bagging-based merging (BOOM) and incremental updates (SPEC §7), run as a sweep.

    codiemb boom --config FIT_CONFIG --fractions 0.4 0.6 0.8 1.0 [--seeds S ...] --output DIR [fit overrides]
    codiemb boom --incremental --config FIT_CONFIG --deployed DIR --base DIR --new-data SOURCES
                 [--old-fraction 0.1] [--update-weight 0.5] [--seed S] --output DIR [fit overrides]
    codiemb boom ... --print-commands      # one `codiemb fit` line per run (subset files written), no training
    codiemb boom ... --fuse-only           # merge runs trained elsewhere

The options may instead sit in a YAML file under a `boom:` key (command-line flags win); its `config`
names the fit config(s), its `overrides` is a mapping of dotted fit config keys (as a sweep file's), and any
other top-level keys of that file are a fit config piece too. `--new-data` is a YAML/JSON list of sources (as
under `data.train`) or a file holding one. With `--evaluate` (default when the fit config has `data.val`) the
base model, every run (or the deployed and update models) and the merge are scored and tabulated.
This module parses and prints; the work is `sweeps.boom.plan_from_options` (the plan, the runs' data) and
`sweeps.sweep.execute_sweep` (training, scoring, the merge), under OUTPUT's run lock.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument
from codiemb_pl.errors import InputError

BOOM_KEY = "boom"
# YAML `boom:` keys and their types; the command-line flags of the same name (dashes) override them.
YAML_OPTIONS = {"config": (str, list), "fractions": list, "seeds": list, "output": str, "evaluate": bool,
                "incremental": bool, "deployed": str, "base": str, "new_data": (str, list),
                "old_fraction": (int, float), "update_weight": (int, float), "seed": int, "overrides": (dict, list),
                "trust_checkpoint": bool}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="codiemb boom", allow_abbrev=False,
                     description="BOOM: train on random data subsets and merge with Multi-SLERP; "
                                 "unknown --flags are passed to every `codiemb fit`.")
    parser.add_argument("--config", action="append", help="fit config (or a YAML with a `boom:` section); repeatable")
    parser.add_argument("--fractions", type=float, nargs="+", help="fraction of every sub-dataset per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="one seed per run, or one for all (default 0..m-1)")
    parser.add_argument("--output", help="output folder: runs/<run>/, merged/")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                        help="score base, runs and merge on data.val (default: when data.val is set)")
    parser.add_argument("--incremental", action="store_true", default=None, help="incremental update mode")
    parser.add_argument("--deployed", help="incremental: the deployed model folder")
    parser.add_argument("--base", help="incremental: the deployed model's base θ0 (default: model.model_name_or_path)")
    parser.add_argument("--new-data", dest="new_data", help="incremental: YAML/JSON list of new sources, or a file")
    parser.add_argument("--old-fraction", dest="old_fraction", type=float, help="incremental: sample of old data (0.1)")
    parser.add_argument("--update-weight", dest="update_weight", type=float,
                        help="incremental: SLERP weight of the update model (0.5)")
    parser.add_argument("--seed", type=int, help="incremental: seed of the old-data sample and the fit (0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", dest="print_commands", action="store_true", default=None,
                      help="write the runs' data and OUTPUT/sweep.yaml, print one `codiemb fit` line per run, stop")
    mode.add_argument("--fuse-only", dest="fuse_only", action="store_true", default=None,
                      help="do not train: merge the runs already finished")
    add_trust_checkpoint_argument(parser)
    return parser


def _read_yaml(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file", "check the --config path") from None
    except yaml.YAMLError as error:
        raise InputError(path, f"is not valid YAML ({error})", "fix the file") from None


def collect_options(argv: list[str]) -> tuple[dict[str, Any], list[str | dict], list[str]]:
    """(options, fit configs, fit overrides) from the flags and any `boom:` YAML section. A fit config is a
    path, or a fit config piece found beside a `boom:` section (`write_fit_pieces` makes it a file)."""
    parsed, overrides = build_parser().parse_known_args(argv)
    flags = {key: value for key, value in vars(parsed).items() if value is not None and key != "config"}
    options: dict[str, Any] = {}
    fit_configs: list[str | dict] = []  # paths, and fit config pieces found beside a `boom:` section
    for path in parsed.config or []:
        content = _read_yaml(path)
        if not isinstance(content, dict) or BOOM_KEY not in content:
            fit_configs.append(path)
            continue
        section = content.pop(BOOM_KEY) or {}
        if not isinstance(section, dict):
            raise InputError(f"{path}: {BOOM_KEY}", "must be a mapping", "e.g. boom: {fractions: [0.5, 1.0]}")
        for key, value in section.items():
            if key not in YAML_OPTIONS or not isinstance(value, YAML_OPTIONS[key]):
                raise InputError(f"{path}: {BOOM_KEY}.{key}", "unknown key or wrong type",
                                 f"known keys: {', '.join(YAML_OPTIONS)}")
        named = section.get("config", [])
        fit_configs += [named] if isinstance(named, str) else list(named)
        overrides = yaml_overrides(section.get("overrides"), f"{path}: {BOOM_KEY}.overrides") + overrides
        options.update({k: v for k, v in section.items() if k not in ("config", "overrides")})
        if content:  # the rest of the file is a fit config piece of its own
            fit_configs.append(content)
    options.update(flags)
    stray = [arg for arg in overrides if arg.startswith("-") and not arg.startswith("--")]
    if stray:
        raise InputError("codiemb boom", f"unknown option {stray[0]}", "fit overrides look like --section.key value")
    if not fit_configs:
        raise InputError("codiemb boom", "no fit configuration", "pass --config FIT_CONFIG")
    if not options.get("output"):
        raise InputError("codiemb boom", "no output folder", "pass --output DIR (or boom.output in the YAML)")
    return options, fit_configs, overrides


def yaml_overrides(entries: Any, where: str) -> list[str]:
    """A `boom:` section's `overrides` (a mapping of dotted fit config keys, the sweep files' dialect) as fit
    arguments; a list of command-line tokens is refused with the mapping form of what it says."""
    from codiemb_pl.sweeps.overrides import check_overrides, mapping_form, override_args

    if isinstance(entries, list):
        raise InputError(where, "is a list of command-line tokens; overrides are a mapping of dotted config keys, "
                                "as in sweep files", f"write overrides: {mapping_form(entries, where)}")
    return override_args(check_overrides(entries, where))


@register_command("boom")
def boom_command(argv: list[str]) -> int:
    """Run BOOM (or an incremental update) as a sweep, print where the merge is and, optionally, the metric
    table; or, with --print-commands, only the runs' `codiemb fit` lines."""
    options, fit_configs, overrides = collect_options(argv)  # before the heavy imports: `--help` stays fast
    from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
    from codiemb_pl.storage.run_lock import run_lock

    with run_lock(options["output"], "boom", tree=True, folder_option="--output"), \
            trusted_checkpoints(bool(options.get("trust_checkpoint"))):   # the deployed model, members, resumes
        return run_boom_command(options, fit_configs, overrides)


def run_boom_command(options: dict[str, Any], fit_configs: list[str | dict], overrides: list[str]) -> int:
    """`boom_command`'s work, under the output folder's run lock: plan, then print the commands, or run the
    sweep and print what it did."""
    from codiemb_pl.evaluation.tables import comparison_table
    from codiemb_pl.sweeps.boom import plan_from_options, write_evaluation
    from codiemb_pl.sweeps.runs import print_commands
    from codiemb_pl.sweeps.sweep import execute_sweep

    log = lambda line: print(line, flush=True)  # noqa: E731
    plan = plan_from_options(options, fit_configs, overrides, log)
    if options.get("print_commands"):
        print_commands(plan)
        return 0
    fuse_only = bool(options.get("fuse_only"))
    result = execute_sweep(plan, fuse_only=fuse_only, log=log)
    if not fuse_only:
        statuses = [outcome.status for outcome in result.outcomes]
        log(f"[codiemb boom] trained {statuses.count('trained')} run(s), reused {statuses.count('skipped')}")
    if result.exported is None:   # a run failed (exit code 1) or the sweep was interrupted (0): see above
        return result.code
    log(f"[codiemb boom] merged model (Multi-SLERP): {Path(result.exported).resolve()}")
    if plan.evaluate:   # base, members, then the merge, as the leaderboard lists them
        log("\nvalidation metrics\n" + comparison_table(write_evaluation(plan, result.board)))
    return 0
