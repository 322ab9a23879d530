"""`codiemb boom`: bagging-based merging (BOOM) and incremental updates (SPEC §7), run as a sweep.

    codiemb boom --config FIT_CONFIG --fractions 0.4 0.6 0.8 1.0 [--seeds S ...] --output DIR [fit overrides]
    codiemb boom --incremental --config FIT_CONFIG --deployed DIR --base DIR --new-data SOURCES
                 [--old-fraction 0.1] [--update-weight 0.5] [--seed S] --output DIR [fit overrides]
    codiemb boom ... --print-commands      # one `codiemb fit` line per run (subset files written), no training
    codiemb boom ... --fuse-only           # merge runs trained elsewhere

The options may instead sit in a YAML file under a `boom:` key (command-line flags win); its `config`
names the fit config(s), and any other top-level keys of that file are a fit config piece too.
`--new-data` is a YAML/JSON list of sources (as under `data.train`) or a file holding one.
With `--evaluate` (default when the fit config has `data.val`) the base model, every run (or the
deployed and update models) and the merge are scored on the validation sets and tabulated.
The work is `workflows.boom` (plans the runs and writes their data) + `workflows.sweep` (everything else).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from codiemb_pl.storage.atomic import atomic_write_text
from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
from codiemb_pl.cli.main import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.storage.output_paths import check_writable_folder

BOOM_KEY = "boom"
# YAML `boom:` keys and their types; the command-line flags of the same name (dashes) override them.
YAML_OPTIONS = {"config": (str, list), "fractions": list, "seeds": list, "output": str, "evaluate": bool,
                "incremental": bool, "deployed": str, "base": str, "new_data": (str, list),
                "old_fraction": (int, float), "update_weight": (int, float), "seed": int, "overrides": list,
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
        overrides = [str(item) for item in section.get("overrides", [])] + overrides
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


def write_fit_pieces(output: str | Path, fit_configs: list[str | dict]) -> list[str]:
    """The fit config paths, each config piece written to OUTPUT/fit-piece-N.yaml."""
    check_writable_folder(output, "--output")
    paths = []
    for index, item in enumerate(fit_configs):
        if isinstance(item, dict):
            piece = Path(output) / f"fit-piece-{index}.yaml"
            atomic_write_text(piece, yaml.safe_dump(item, sort_keys=False))
            item = str(piece)
        paths.append(item)
    return paths


def parse_sources(spec: str | list, where: str) -> list[SourceConfig]:
    """SourceConfigs from a list of dicts, a YAML/JSON text of one, or a file holding one."""
    if isinstance(spec, str):
        spec = _read_yaml(spec) if Path(spec).is_file() else yaml.safe_load(spec)
    if not isinstance(spec, list) or not all(isinstance(item, dict) for item in spec):
        raise InputError(where, "must be a list of sources", 'e.g. [{name: new, task: ir, path: data/new.jsonl}]')
    from codiemb_pl.data.eval_builders import as_source_config

    return [as_source_config(item, f"{where}[{index}]") for index, item in enumerate(spec)]


@register_command("boom")
def boom_command(argv: list[str]) -> int:
    """Run BOOM (or an incremental update) as a sweep, print where the merge is and, optionally, the metric
    table; or, with --print-commands, only the runs' `codiemb fit` lines."""
    options, fit_configs, overrides = collect_options(argv)  # before the heavy imports: `--help` stays fast
    from codiemb_pl.storage.run_lock import run_lock

    with run_lock(options["output"], "boom", tree=True, folder_option="--output"), \
            trusted_checkpoints(bool(options.get("trust_checkpoint"))):   # the deployed model, members, resumes
        return run_boom_command(options, write_fit_pieces(options["output"], fit_configs), overrides)


def run_boom_command(options: dict[str, Any], fit_configs: list[str], overrides: list[str]) -> int:
    """`boom_command`'s work, under the output folder's run lock."""
    from codiemb_pl.evaluation.tables import comparison_table
    from codiemb_pl.sweeps.boom import plan_boom, plan_incremental, plan_runs, run_boom, run_incremental
    from codiemb_pl.sweeps.sweep import print_commands, resolve_fit_config

    resolved = resolve_fit_config(fit_configs, overrides)
    output = Path(options["output"])
    policy = (resolved.get("data") or {}).get("policy")
    if policy != "proportional":
        print(f"[codiemb boom] note: data.policy is {policy!r}; BOOM's runs use batch-level shuffling "
              "(`proportional`)", flush=True)
    evaluate, only_print = options.get("evaluate"), options.get("print_commands")
    execution = {"fuse_only": bool(options.get("fuse_only")), "log": lambda line: print(line, flush=True)}
    if options.get("incremental"):
        if not options.get("deployed") or not options.get("new_data"):
            raise InputError("codiemb boom --incremental", "needs --deployed DIR and --new-data SOURCES",
                             "name the deployed model folder and the new sub-datasets")
        inputs = (resolved, options["deployed"], options.get("base") or resolved["model"]["model_name_or_path"],
                  parse_sources(options["new_data"], "--new-data"), output)
        settings = {"old_fraction": float(options.get("old_fraction", 0.1)), "seed": int(options.get("seed", 0)),
                    "update_weight": float(options.get("update_weight", 0.5)), "evaluate": evaluate}
        if only_print:
            print_commands(plan_incremental(*inputs, **settings)[0])
            return 0
        result = run_incremental(*inputs, **settings, **execution)
    else:
        if not options.get("fractions"):
            raise InputError("codiemb boom", "no fractions", "pass --fractions 0.4 0.6 0.8 1.0")
        runs = plan_runs(options["fractions"], options.get("seeds"))
        if only_print:
            print_commands(plan_boom(resolved, runs, output, evaluate=evaluate))
            return 0
        result = run_boom(resolved, runs, output, evaluate=evaluate, **execution)
    if not execution["fuse_only"]:
        statuses = [outcome.status for outcome in result["outcomes"]]
        print(f"[codiemb boom] trained {statuses.count('trained')} run(s), reused {statuses.count('skipped')}",
              flush=True)
    if result["merged"] is None:   # a run failed (exit code 1) or the sweep was interrupted (0): see above
        return result["code"]
    print(f"[codiemb boom] merged model (Multi-SLERP): {Path(result['merged']).resolve()}", flush=True)
    plan = result["plan"]
    if plan.evaluate:   # base, members, then the merge, as the leaderboard lists them
        rows = [("merged" if c.name == plan.export else c.name, c.metrics) for c in result["board"].candidates]
        atomic_write_text(output / "evaluation.json", json.dumps(dict(rows), indent=2) + "\n")
        print("\nvalidation metrics\n" + comparison_table(rows), flush=True)
    return 0
