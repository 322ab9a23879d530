"""`codiemb` command line: LightningCLI's fit / validate / test / predict, plus the project commands.

`main(args=None)` is the single entry point (console script `codiemb`, `python -m codiemb_pl`, and tests
calling `main([...])` in-process). Bad input (`InputError`) ends with one clear line and exit code 2;
set `CODIEMB_DEBUG=1` or pass `--debug` for the traceback.

This module imports nothing heavy: `codiemb --help`, a project command's `--help` and argument errors
stay fast. Lightning is imported (`cli.lightning`) only for a LightningCLI subcommand, and a project
command's module only when that command runs (`commands.discover` finds them without importing them;
`commands.load` imports the one that runs, which registers itself in `commands.EXTRA_COMMANDS`).
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Optional

from codiemb_pl.commands import EXTRA_COMMANDS, discover, load
from codiemb_pl.errors import InputError

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train the encoder on data.train, validating on data.val",
    "validate": "score a checkpoint on the data.val sets",
    "test": "score a checkpoint on the data.test sets (same metrics as validation, logged as test/...)",
    "predict": "embed a file of texts (data.predict) into --predict_output (.npy or .parquet)",
}


def overview() -> str:
    """`codiemb --help`: every command with its one-line summary."""
    project = {name: info.summary for name, info in discover().items()}
    project.update({name: fn.__doc__.strip().splitlines()[0] if fn.__doc__ else ""
                    for name, fn in EXTRA_COMMANDS.items() if name not in project})
    width = max(map(len, [*LIGHTNING_COMMANDS, *project]))
    lines = ["usage: codiemb COMMAND [options]    (codiemb COMMAND --help for a command's options)", "",
             "training and evaluation with a config (LightningCLI: --config FILE, --section.key value, "
             "--print_config):"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in LIGHTNING_COMMANDS.items()]
    lines += ["", "project commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in sorted(project.items())]
    lines += ["", "--debug (or CODIEMB_DEBUG=1): show the traceback of an error instead of its one line"]
    return "\n".join(lines)


def command_names() -> list[str]:
    return [*LIGHTNING_COMMANDS, *sorted(set(discover()) | set(EXTRA_COMMANDS))]


def project_command(name: str) -> Optional[Callable[[list[str]], int]]:
    """The function of project command `name` (its module imported on demand), or None."""
    if name not in EXTRA_COMMANDS:
        if name not in discover():
            return None
        load(name)
    return EXTRA_COMMANDS.get(name)


def unknown_command(name: str) -> InputError:
    names = command_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return InputError("command line", f"unknown command {name!r}",
                      f"{hint}commands: {', '.join(names)}; see `codiemb --help`")


def main(args: Optional[list[str]] = None) -> int:
    """Run one `codiemb` command; returns the process exit code (0 on success)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("CODIEMB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        if not argv:
            raise InputError("command line", "no command given", "see `codiemb --help` for the commands")
        if argv[0] in ("-h", "--help"):
            print(overview())
            return 0
        command = project_command(argv[0]) if argv[0] not in LIGHTNING_COMMANDS else None
        if command is not None:
            return int(command(argv[1:]) or 0)
        if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
            raise unknown_command(argv[0])
        from codiemb_pl.cli.lightning import run_lightning_cli

        return run_lightning_cli(None if args is None and argv == sys.argv[1:] else argv)
    except InputError as error:
        if debug:
            raise
        print(f"codiemb: error: {error}", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
