"""The flags of every `codiemb` command, read from the parsers the commands themselves build.

Project commands (`codiemb_pl.commands.discover()`: fuse, evaluate, mine-negatives, boom, sweep, and any module
that registers one) each have a `build_parser()` returning their argparse parser; every option of it becomes a row
(flags, value, default, help). The LightningCLI commands (fit, validate, test, predict) take a config: their
`model.*` / `data.*` keys are on the config reference page, so here they get their summary and common flags.
"""

from __future__ import annotations

import argparse
import importlib

LIGHTNING_FLAGS = [
    ("--config FILE", "a config file (repeatable; later files and flags win)"),
    ("--section.key VALUE", "any key of the config reference, e.g. `--data.policy balanced`"),
    ("--print_config", "print the fully resolved config and stop"),
    ("--ckpt_path PATH | last", "resume (`fit`) or score (`validate`, `test`, `predict`) a checkpoint; `last` picks "
                                "the newest complete one"),
    ("--weights_only false", "unpickle a trusted checkpoint fully (default: weights-only loading)"),
    ("--predict_output FILE", "`predict` only: `.npy` or `.parquet` to write the embeddings to"),
    ("--debug", "show the traceback of an error instead of its one line (or `CODIEMB_DEBUG=1`)"),
]


def project_parsers() -> dict[str, argparse.ArgumentParser]:
    """`{command name: its parser}` for every project command, in name order."""
    from codiemb_pl.commands import discover

    parsers = {}
    for name, info in sorted(discover().items()):
        module = importlib.import_module(info.module)
        parsers[name] = module.build_parser()
    return parsers


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.choices:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    if action.nargs in ("+", "*"):
        return f"{metavar} ..."
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([str(metavar)] * action.nargs)
    return str(metavar)


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | value | default | what |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(action.option_strings) or action.dest
        if isinstance(action, argparse.BooleanOptionalAction):
            flags = " / ".join(action.option_strings)
        default = "" if action.default in (None, argparse.SUPPRESS, False, []) else f"`{action.default!r}`"
        repeat = (" (repeatable)" if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or "")
                  else "")
        value = _value(action)
        rows.append(f"| `{flags}` | {('`' + _cell(value) + '`') if value else ''} | {default} | "
                    f"{_cell(action.help or '')}{repeat} |")
    return rows


def markdown() -> str:
    from codiemb_pl.cli.main import LIGHTNING_COMMANDS
    from codiemb_pl.commands import discover

    lines = ["# Command reference", "",
             "Generated when the site is built, from each command's own parser, so the flags below are "
             "exactly what `codiemb COMMAND --help` accepts. Project commands also read their options from "
             "`--config FILE.yaml` where they list it (keys: the long flags without dashes).", "",
             "## Training and scoring with a config: `fit`, `validate`, `test`, `predict`", "",
             "LightningCLI commands: `codiemb COMMAND --config FILE [--config PIECE ...] [--section.key value ...]`. "
             "Every `model.*` and `data.*` key is in the [config reference](config.md).", "",
             "| command | what |", "|---|---|"]
    lines += [f"| `codiemb {name}` | {summary} |" for name, summary in LIGHTNING_COMMANDS.items()]
    lines += ["", "| flag | what |", "|---|---|"]
    lines += [f"| `{_cell(flag)}` | {what} |" for flag, what in LIGHTNING_FLAGS]
    summaries = {name: info.summary for name, info in discover().items()}
    for name, parser in project_parsers().items():
        usage = " ".join(parser.format_usage().split())
        usage = usage.removeprefix("usage: ")
        lines += ["", f"## `codiemb {name}`", "", summaries.get(name, "") + ".", "",
                  f"```text\n{usage}\n```", "", *option_rows(parser)]
        if parser.epilog:
            lines += ["", parser.epilog]
    return "\n".join(lines) + "\n"
