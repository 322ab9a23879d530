"""Argument parsing shared by the project commands: bad arguments become one `InputError` line, and
options may come from YAML files (`--config`), as `codiemb fit` takes them.

`CommandParser(prog="codiemb NAME", ...)` is an `argparse.ArgumentParser` whose errors (unknown or
missing options, bad values) raise `InputError("codiemb NAME", message, "see `codiemb NAME --help`")`,
which the CLI prints as one line with exit code 2, instead of argparse's usage block and `SystemExit`.
`--help` still prints the help and exits 0.

With `config_files=True` the command also takes `--config FILE.yaml` (repeatable): a mapping of option
names (the long flag without its dashes, `-` or `_`: `batch_size`, `sts`, `model`; positionals by name)
to values. Later files override earlier ones and the command line overrides them all (a repeatable
option given on the command line replaces the file's list). Unknown keys and wrong value types are one
error naming the file and key, with the nearest valid key.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Sequence

from codiemb_pl.errors import InputError

CONFIG_OPTION = "--config"
TRUST_CHECKPOINT_HELP = ("unpickle .ckpt / pytorch_model.bin files fully, running any code they name: only for "
                         "files from a source you trust (default: weights-only loading, other objects refused)")
_UNSET = object()   # default of an option the YAML sets: tells "not given on the command line" apart


class CommandParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as an `InputError` (one line, exit code 2) instead of exiting,
    optionally reading option values from `--config` YAML files."""

    def __init__(self, *args: Any, config_files: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config_files = config_files
        if config_files:
            self.add_argument(CONFIG_OPTION, action="append", metavar="FILE.yaml",
                              help="YAML mapping of option values (keys: the long flags without dashes, e.g. "
                                   "batch_size); repeatable, later files and the command line win")

    def error(self, message: str):  # type: ignore[override]
        raise InputError(self.prog, message, f"see `{self.prog} --help`")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        if not self.config_files:
            return super().parse_known_args(args, namespace)
        argv = list(args) if args is not None else None
        files = self._config_paths(argv)
        if not files:
            return super().parse_known_args(argv, namespace)
        actions = {action.dest: action for action in self._actions}
        values: dict[str, Any] = {}   # every file's values checked, even those the command line overrides
        for path in files:
            values.update({dest: _config_value(actions[dest], value, f"{path}: {dest}")
                           for dest, value in self._read_config(path).items()})
        actions = {dest: action for dest, action in actions.items() if dest in values}
        saved = {dest: (action.default, action.required, action.nargs) for dest, action in actions.items()}
        unset = {dest: None if isinstance(action, argparse._AppendAction) else _UNSET for dest, action in actions.items()}
        try:
            for dest, action in actions.items():   # what the command line leaves unset keeps the `unset` marker
                action.default, action.required = unset[dest], False
                if not action.option_strings and action.nargs is None:
                    action.nargs = "?"              # a positional the YAML gives may be left out
            parsed, extras = super().parse_known_args(argv, namespace)
        finally:
            for dest, (default, required, nargs) in saved.items():
                actions[dest].default, actions[dest].required, actions[dest].nargs = default, required, nargs
        for dest, action in actions.items():
            if getattr(parsed, dest) is unset[dest]:
                setattr(parsed, dest, values[dest])
        return parsed, extras

    def _config_paths(self, argv: list[str] | None) -> list[str]:
        """The `--config` files of the command line (read before the rest is parsed)."""
        scan = argparse.ArgumentParser(add_help=False)
        scan.add_argument(CONFIG_OPTION, action="append", default=[])
        known, _ = scan.parse_known_args(argv)
        return known.config

    def _read_config(self, path: str) -> dict[str, Any]:
        """{option dest: value} of one YAML file; unknown keys are an `InputError` with the nearest valid key."""
        import yaml

        try:
            content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{CONFIG_OPTION} {path}", "no such file", "check the path") from None
        except yaml.YAMLError as error:
            raise InputError(path, f"is not valid YAML ({error})".replace("\n", " "), "fix the file") from None
        if content is None:
            return {}
        if not isinstance(content, dict):
            raise InputError(path, "must be a mapping of option names to values", "e.g. batch_size: 32")
        known = {action.dest for action in self._actions
                 if action.dest not in ("help", "config") and action.dest is not argparse.SUPPRESS}
        options: dict[str, Any] = {}
        for key, value in content.items():
            dest = str(key).lstrip("-").replace("-", "_")
            if dest not in known:
                near = difflib.get_close_matches(dest, sorted(known), n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                raise InputError(f"{path}: {key}", "unknown option", f"{hint}valid keys: {', '.join(sorted(known))}")
            options[dest] = value
        return options


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value checked and converted as argparse would convert the same option on the command line."""
    def convert(item: Any) -> Any:
        if isinstance(item, (dict, list)):
            raise InputError(where, f"expected a single value, got {item!r}", "see the command's --help")
        if action.type is not None and isinstance(item, str):
            try:
                item = action.type(item)
            except (TypeError, ValueError) as error:
                raise InputError(where, f"invalid value {item!r} ({error})", "see the command's --help") from None
        if action.choices is not None and item not in action.choices:
            raise InputError(where, f"{item!r} is not one of {list(action.choices)}", "pick one of them")
        return item

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise InputError(where, f"expected true or false, got {value!r}", f"write {where.rsplit(': ', 1)[-1]}: true")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise InputError(where, f"expected a list of {action.nargs} values, got {value!r}",
                             f"e.g. [{', '.join(['...'] * action.nargs)}]")
        return [convert(item) for item in items]
    return convert(value)


def add_trust_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-checkpoint`: the opt-in of `checkpoint_loading.trusted_checkpoints` for a command."""
    parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true", default=None,
                        help=TRUST_CHECKPOINT_HELP)
