"""Class and module paths that moved in the 0.2 re-layout (see CHANGELOG.md), and the one line a config that
still names an old path gets.

`MOVED_MODULES` maps each old module to its new home; a dotted path under an old module (e.g.
`codiemb_pl.run_folder.CSVLogger`) moved with it, except the names in `MOVED_NAMES`, which changed module on
their own. `new_path(old)` gives the new path; `find_moved_path(text)` the first old path in a config's text;
`normalise_paths(value)` rewrites old paths inside a resolved config (so a sweep recorded before the move
compares equal to the same sweep resolved after it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.errors import InputError

PACKAGE = "codiemb_pl"

MOVED_MODULES: dict[str, str] = {
    "atomic": "storage.atomic", "run_lock": "storage.run_lock", "output_paths": "storage.output_paths",
    "checkpoint_loading": "storage.checkpoint_loading", "weight_checks": "storage.weight_checks",
    "encoder": "model.encoder", "pooling": "model.pooling", "decoder": "model.decoder", "lora": "model.lora",
    "bucketing": "model.bucketing", "device": "model.device", "prompts": "model.prompts", "model_card": "model.card",
    "module": "training.module", "grad_cache": "training.grad_cache", "rng_state": "training.rng_state",
    "sharding": "training.sharding", "checkpoint_io": "training.checkpoint_io", "trainer": "training.trainer",
    "resume": "training.resume", "reporting": "evaluation.tables", "lightning_cli": "cli.lightning",
    "config_errors": "cli.config_errors", "held_logs": "cli.held_logs", "run_folder": "cli.run_folder",
    "embeddings_file": "cli.predict_output", "mining": "workflows.mine", "workflows.sweep": "sweeps.sweep",
    "workflows.boom": "sweeps.boom", "workflows.validation": "data.eval_builders", "data.validation": "data.eval_sets",
    "data.cache": "data.cache.entries", "data.arrow_records": "data.cache.records", "data.arrow_jsonl": "data.cache.columns",
    "data.arrow_tokens": "data.cache.tokens", "data.token_ids": "data.cache.token_ids",
    "data.arrow_dataset": "data.cache.dataset", "data.text_bound": "model.text_bound", "data.tokenize": "model.pooling",
}
"""Old module (under `codiemb_pl.`) -> new module. `codiemb_pl.cli` stayed (a package now; the entry is `cli.main`)."""

MOVED_NAMES: dict[str, str] = {
    "run_folder.CSVLogger": "training.loggers.CSVLogger",
    "lora.merge_adapter_checkpoint": "fusion.sources.merge_adapter_checkpoint",
    "output_paths.fit_output_folders": "cli.run_folder.fit_outputs",
    "output_paths.check_fit_outputs": "cli.run_folder.check_fit_outputs",
    "data.tokenize.tokenize_with_prefixes": "data.collate.tokenize_texts",
}
"""Old `module.Name` -> new `module.Name`, for names that did not follow their old module."""

_OLD_PATH = re.compile(r"\b" + re.escape(PACKAGE) + r"\.("
                       + "|".join(re.escape(m) for m in sorted(MOVED_MODULES, key=len, reverse=True))
                       + r")((?:\.\w+)*)(?![\w.])")
# `codiemb_pl.data.cache` is both an old module and (now) a package: only the old module's own names count as old
_STILL_VALID_PREFIXES = tuple(f"{PACKAGE}.{new}" for new in MOVED_MODULES.values())


def new_path(old: str) -> Optional[str]:
    """The new dotted path of `old` (a module or `module.Name` under an old module), or None if it did not move."""
    match = _OLD_PATH.fullmatch(old)
    if match is None or old.startswith(_STILL_VALID_PREFIXES):
        return None
    module, rest = match.group(1), match.group(2)
    name = f"{module}{rest}"
    for old_name, new_name in MOVED_NAMES.items():
        if name == old_name or name.startswith(old_name + "."):
            return f"{PACKAGE}.{new_name}{name[len(old_name):]}"
    return f"{PACKAGE}.{MOVED_MODULES[module]}{rest}"


def find_moved_path(text: str) -> Optional[tuple[int, str, str]]:
    """(1-based line, old path, new path) of the first moved path named in `text`, or None."""
    for number, line in enumerate(text.splitlines(), start=1):
        for match in _OLD_PATH.finditer(line):
            replacement = new_path(match.group(0))
            if replacement is not None:
                return number, match.group(0), replacement
    return None


def check_no_moved_paths(args: Iterable[str]) -> None:
    """Raise one `InputError` if a `--config` file or a command-line value names a moved class or module path."""
    args = list(args)
    for index, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        is_config = index > 0 and args[index - 1] == "--config" or arg.startswith("--config=")
        if is_config and Path(value).is_file():
            try:
                text = Path(value).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # the parser reports unreadable configs itself
            found = find_moved_path(text)
            if found is not None:
                raise _moved(f"{value}:{found[0]}", found[1], found[2])
        else:
            found = find_moved_path(value)
            if found is not None:
                raise _moved("command line", found[1], found[2])


def check_no_moved_values(config: Any, where: str) -> None:
    """Raise one `InputError` if a string inside `config` (a config mapping: dicts, lists, strings) names a moved
    class or module path; `where` names the config, followed by the dotted key."""
    for key, text in _strings(config, ""):
        found = find_moved_path(text)
        if found is not None:
            raise _moved(f"{where}: {key}" if key else where, found[1], found[2])


def _strings(value: Any, key: str):
    """(dotted key, string) of every string inside `value`."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _strings(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{key}[{index}]")
    elif isinstance(value, str):
        yield key, value


def normalise_paths(value: Any) -> Any:
    """`value` (a resolved config: dicts, lists, strings) with every moved dotted path replaced by its new one."""
    if isinstance(value, dict):
        return {key: normalise_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalise_paths(item) for item in value]
    if isinstance(value, str):
        return _OLD_PATH.sub(lambda m: new_path(m.group(0)) or m.group(0), value)
    return value


def _moved(where: str, old: str, new: str) -> InputError:
    return InputError(where, f"{old} moved to {new} in codiemb_pl 0.2",
                      f"write {new} instead; CHANGELOG.md lists every move")
