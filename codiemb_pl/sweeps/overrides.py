"""The one override dialect: a mapping of dotted fit config keys to values, as `codiemb fit --print_config` names
them (`{data.policy: balanced, trainer.max_steps: 2}`), in sweep files (`overrides`, each run, the grid) and in
BOOM's `boom:` section. A run's command line is derived from it (`override_args`); the command line's own
`--section.key value` flags stay flags. A list of such tokens in a file is refused with its mapping form
(`mapping_form`). Imports nothing heavy (BOOM's argument parsing uses it before any model code loads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from codiemb_pl.errors import InputError

MANAGED_KEYS = {"trainer.default_root_dir": "the sweep puts every run in OUTPUT/runs/NAME",
                "ckpt_path": "the sweep resumes a run from its own checkpoints"}


def check_overrides(entries: Any, where: str) -> dict[str, Any]:
    """A mapping of dotted fit config keys (not the keys the sweep manages) -> values (None: no overrides)."""
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise InputError(where, "overrides must be a mapping of dotted config keys",
                         "e.g. {data.policy: balanced, model.lr: 3.0e-5}")
    for key in entries:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise InputError(f"{where}: {key!r}", "not a dotted config key", "write keys like data.policy (no dashes)")
        if key in MANAGED_KEYS:
            raise InputError(f"{where}: {key}", f"cannot be overridden ({MANAGED_KEYS[key]})", "remove this key")
    return dict(entries)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`{dotted.key: value}` as `codiemb fit` arguments: `--dotted.key VALUE` (lists and mappings as JSON)."""
    args: list[str] = []
    for key, value in overrides.items():
        args += [f"--{key}", cli_value(value)]
    return args


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it back: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def mapping_form(tokens: Sequence[Any], where: str) -> str:
    """`["--trainer.max_steps", "2", "--data.policy=balanced"]` as the mapping a file should hold, in YAML flow
    style: `{trainer.max_steps: 2, data.policy: balanced}` (values read as the command line means them)."""
    mapping: dict[str, Any] = {}
    items = [str(token) for token in tokens]
    index = 0
    while index < len(items):
        token = items[index]
        if not token.startswith("--") or len(token) < 3:
            raise InputError(where, f"{token!r} is not a --section.key option",
                             "write overrides as a mapping, e.g. {trainer.max_steps: 2}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            following = items[index + 1] if index + 1 < len(items) else None
            has_value = following is not None and not following.startswith("--")
            value = following if has_value else "true"
            index += 1 if has_value else 0
        mapping[key] = _yaml_value(value)
        index += 1
    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=10**9).strip()


def _yaml_value(text: str) -> Any:
    """A command-line value as the mapping holds it: JSON (`2`, `1e-3`, `[1, 2]`), else a YAML scalar (`true`,
    `balanced`); text that only YAML would read as a mapping or list (`a: b`) stays text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")) else value
