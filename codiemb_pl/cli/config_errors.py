"""jsonargparse's parse errors as one `InputError` line: where (config file and line, or the command line),
which key, and the nearest valid key.

jsonargparse blames a misspelt YAML key on no file (`Subcommand 'fit' does not accept option
'data.polcy'`) and a misspelt key inside a `data.train` entry on a ~900-character Union dump. Here the
key is taken from the message, looked up in the `--config` files and the command line to name its
place, and compared (difflib) with the keys the parser or the entry's class accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from codiemb_pl.errors import InputError

HELP_FIX = "see `codiemb {command} --help` for the accepted options and values"

_UNACCEPTED_OPTION = re.compile(r"does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.IGNORECASE)
_ENTRY_PROBLEM = re.compile(r"Problem with given class_path '([\w.]+)':\s*(.*?)(?:\s+- Expected a <class 'NoneType'>.*)?$")
_ENTRY_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_PARSER_KEY = re.compile(r'(?:Parser key|key) "([^"]+)"')
_UNION_PREAMBLE = re.compile(r"Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: - ")


def explain_config_error(message: str, args: list[str], valid_keys: Iterable[str],
                         command: str = "<command>") -> InputError:
    """The one-line `InputError` for jsonargparse's error `message` on command line `args`.

    `valid_keys` are the dotted keys the subcommand's parser accepts (`data.policy`, `trainer.max_steps`, ...).
    """
    valid = sorted(set(valid_keys))
    flat = " ".join(line.strip() for line in message.splitlines() if line.strip())
    fix = HELP_FIX.format(command=command)
    unknown = _UNACCEPTED_OPTION.search(flat)
    if unknown:
        return unknown_key_error(unknown.group(1), args, valid, fix)
    unrecognized = _UNRECOGNIZED.search(flat)
    if unrecognized:
        options = [token for token in unrecognized.group(1).split() if token.startswith("--")]
        if options:
            return unknown_key_error(options[0][2:].split("=", 1)[0].split("+=", 1)[0], args, valid, fix)
    list_key = _PARSER_KEY.search(flat)
    entry = _ENTRY_PROBLEM.search(flat)
    if list_key and entry:
        return entry_error(list_key.group(1), entry.group(1), entry.group(2).strip(), args, fix)
    problem = re.sub(r'^Parser key "[^"]+":\s*', "", flat)
    return InputError(list_key.group(1) if list_key else "command line", problem, fix)


def unknown_key_error(key: str, args: list[str], valid: list[str], fix: str) -> InputError:
    """A key no parser section accepts: where it was given, and the closest accepted key."""
    parent, _, leaf = key.rpartition(".")
    siblings = sorted({k[len(parent) + 1:].split(".")[0] for k in valid if parent and k.startswith(parent + ".")})
    if siblings:
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        suggestion = f"{parent}.{close[0]}" if close else None
    else:  # an unknown section: compare the whole key with every accepted key
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        suggestion = close[0] if close else None
    where, on_command_line = locate_key(key, args)
    shown = f"--{key}" if on_command_line else key
    hint = f"did you mean {'--' if on_command_line else ''}{suggestion}? " if suggestion else ""
    return InputError(where, f"unknown key {shown}", hint + fix)


def entry_error(list_key: str, class_path: str, inner: str, args: list[str], fix: str) -> InputError:
    """A bad key (or value) inside one entry of a list of dataclasses, e.g. a `data.train` source."""
    option = _ENTRY_OPTION.search(inner)
    if not option:
        return entry_value_error(list_key, inner, args, fix)
    bad = option.group(1)
    fields = accepted_fields(class_path)
    close = difflib.get_close_matches(bad, fields, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    where, entry = locate_entry_key(list_key, bad, args)
    what = f"{list_key} entry {entry}" if entry else f"a {list_key} entry"
    return InputError(where, f"unknown key {bad!r} in {what}",
                      f"{hint}an entry accepts: {', '.join(fields)}" if fields else hint + fix)


def entry_value_error(list_key: str, inner: str, args: list[str], fix: str) -> InputError:
    """A bad value inside one entry (`batch_size: many`, `task: irr`): the entry's place and the value's problem."""
    field = _PARSER_KEY.search(inner)
    problem = _UNION_PREAMBLE.sub("", inner)
    problem = re.sub(r'^Parser key "[^"]+":\s*', "", problem).strip()
    if not field:
        return InputError(list_key, f"an entry is invalid: {problem}", fix)
    given = re.search(r"Got value: (.+)$", problem)
    where, entry = locate_entry_key(list_key, field.group(1), args, given.group(1).strip() if given else None)
    what = f"{list_key} entry {entry}" if entry else f"a {list_key} entry"
    return InputError(where, f"{what}: {field.group(1)}: {problem}", fix)


def accepted_fields(class_path: str) -> list[str]:
    """Constructor parameters (dataclass fields) of `class_path`, or [] if it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


# -- where a key was given ----------------------------------------------------------------------------------
def config_files(args: list[str]) -> list[str]:
    """The `--config` / `-c` files of a command line, in order."""
    files = []
    for index, token in enumerate(args):
        if token in ("--config", "-c") and index + 1 < len(args):
            files.append(args[index + 1])
        elif token.startswith("--config="):
            files.append(token.split("=", 1)[1])
    return files


def locate_key(key: str, args: list[str]) -> tuple[str, bool]:
    """(`"FILE:LINE"` of the config file that sets `key`, or `"command line"`; whether it was an option)."""
    option = f"--{key}"
    if any(token == option or token.startswith(option + "=") for token in args):
        return "command line", True
    for path in config_files(args):
        line = _yaml_key_line(path, key.split("."))
        if line is not None:
            return f"{path}:{line}", False
    return "command line", False


def locate_entry_key(list_key: str, bad: str, args: list[str], value: Optional[str] = None
                     ) -> tuple[str, Optional[str]]:
    """(`"FILE:LINE"` of the list entry holding key `bad` (with `value`, if given), or the command line;
    `"N (name)"` of that entry)."""
    for token_index, token in enumerate(args):
        if token == f"--{list_key}" and token_index + 1 < len(args) and bad in args[token_index + 1]:
            return f"command line (--{list_key})", None
    for path in config_files(args):
        found = _yaml_entry_key(path, list_key.split("."), bad, value)
        if found is not None:
            return f"{path}:{found[0]}", found[1]
    return "command line", None


def _yaml_root(path: str):
    import yaml

    try:
        return yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _mapping_child(node: Any, key: str) -> tuple[Any, Any]:
    """(key node, value node) of `key` in a YAML mapping node, or (None, None)."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if getattr(key_node, "value", None) == key:
                return key_node, value_node
    return None, None


def _yaml_key_line(path: str, parts: list[str]) -> Optional[int]:
    node, key_node = _yaml_root(path), None
    for part in parts:
        key_node, node = _mapping_child(node, part)
        if key_node is None:
            return None
    return key_node.start_mark.line + 1


def _yaml_entry_key(path: str, list_parts: list[str], bad: str, value: Optional[str] = None
                    ) -> Optional[tuple[int, str]]:
    import yaml

    node = _yaml_root(path)
    for part in list_parts:
        _, node = _mapping_child(node, part)
    if not isinstance(node, yaml.SequenceNode):
        return None
    for index, item in enumerate(node.value):
        key_node, value_node = _mapping_child(item, bad)
        if key_node is not None and (value is None or getattr(value_node, "value", None) == value):
            _, name_node = _mapping_child(item, "name")
            name = f" ({name_node.value})" if name_node is not None else ""
            return key_node.start_mark.line + 1, f"{index + 1}{name}"
    return None


def parser_keys(parser: Any) -> list[str]:
    """Every dotted key a jsonargparse parser accepts (its actions' destinations)."""
    return [action.dest for action in getattr(parser, "_actions", ())
            if isinstance(getattr(action, "dest", None), str) and not action.dest.endswith(".help")
            and action.dest not in ("help", "config", "print_config")]
