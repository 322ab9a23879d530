"""The sweep file (`codiemb sweep --sweep FILE`, format in `sweeps/sweep.py`): its keys, their types and defaults,
and every check the file alone allows, before any fit config is resolved.

Types and defaults are two dataclasses, `SweepFile` and `FusionSection`, checked by jsonargparse as the fit
config is; its errors become one `InputError` line: the file, the key, what is wrong and an example (an
unknown key gets the nearest valid one). The free-form parts are checked here by hand, naming the run or
the grid key: overrides (dotted fit config keys, not the keys the sweep manages), runs (named, folder names,
unique), the grid (non-empty value lists), and the fusion options (checkpoint choices, fixed members, merge
methods tried with the member count, what `evaluate: false` allows, an export folder the sweep leaves free).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import re
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from codiemb_pl.errors import InputError
from codiemb_pl.sweeps.overrides import check_overrides, cli_value

FINAL = "final"                       # the run's export folder, <run>/model
EXPORT_FOLDER = "model"               # OUTPUT/model: the exported candidate (default: the winner)
RESERVED_FOLDERS = ("runs", "fusion")  # OUTPUT/runs/NAME, OUTPUT/fusion/
DEFAULT_METHODS: list[dict[str, Any]] = [
    {"method": "delta_guided", "params": {"gamma": 1.0}},
    {"method": "uniform_soup"},
    {"method": "greedy_soup"},
    {"method": "ties", "params": {"density": 0.2}},
    {"method": "dare", "params": {"drop_rate": 0.5}},
    {"method": "multi_slerp"},
    {"method": "self_positioning", "params": {"steps": 200}},
]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
SNAPSHOT_CHOICE = re.compile(r"^(last|best_ir|best_sts|best|epoch\d+|step\d+)$")


def _key(default: Any = None, *, kind: str, example: str, factory: Any = None) -> Any:
    """A schema field: its default, what it must be (`kind`) and an example, for the one-line error."""
    metadata = {"kind": kind, "example": example}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SweepFile:
    """The top-level keys of a sweep file."""

    config: Optional[str] = _key(kind="a fit config path", example="config: configs/quickstart.yaml")
    output: Optional[str] = _key(kind="a folder path", example="output: runs/sweep_policies")
    overrides: Optional[dict[str, Any]] = _key(kind="a mapping of dotted config keys",
                                               example="{data.policy: balanced, model.lr: 3.0e-5}")
    runs: Optional[list[Any]] = _key(kind="a list of runs", example="runs: [{name: a, data.policy: balanced}]")
    grid: Optional[dict[str, Any]] = _key(kind="a non-empty mapping of dotted keys to value lists",
                                          example="grid: {seed_everything: [1, 2, 3]}")
    fusion: Optional[dict[str, Any]] = _key(kind="a mapping", example="fusion: {methods: [multi_slerp]}")
    manifest: Optional[dict[str, Any]] = _key(kind="a mapping", example="manifest: {purpose: bagging}")


@dataclass
class FusionSection:
    """The `fusion:` keys (`methods` and `members` are checked by `fusion_options`, entry by entry)."""

    checkpoints: Union[str, list[str]] = _key(kind="a non-empty list", example="[final, best_ir, best_sts]",
                                              factory=lambda: [FINAL])
    methods: Any = _key(kind="a list of merge methods", example="methods: [multi_slerp]")
    metric: str = _key("val/avg", kind="a metric name", example="val/avg")   # workflows.fusion.leaderboard.DEFAULT_METRIC
    seed: Optional[int] = _key(kind="an integer", example="seed: 0")
    eval_batch_size: Optional[int] = _key(kind="an integer", example="eval_batch_size: 64")
    base: Optional[str] = _key(kind="a model folder", example="base: runs/base_model")
    members: Optional[list[Any]] = _key(kind="a list", example="members: [{name: old, path: runs/old/model}]")
    export: Optional[str] = _key(kind="a candidate name", example="export: multi_slerp")
    export_folder: Optional[str] = _key(EXPORT_FOLDER, kind="a folder name", example="export_folder: model")
    evaluate: bool = _key(True, kind="true or false", example="evaluate: false")


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepFile))
FUSION_KEYS = tuple(f.name for f in dataclasses.fields(FusionSection))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_sweep_file(path: str | Path) -> SweepFile:
    """The sweep file, typed (else one-line InputError: not found, not YAML, a key twice, unknown key, bad type)."""
    try:
        content = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except FileNotFoundError:
        raise InputError(str(path), "sweep file not found", "check the --sweep path") from None
    except yaml.YAMLError as error:
        raise InputError(str(path), f"is not valid YAML ({' '.join(str(error).split())})",
                         "fix the sweep file") from None
    if not isinstance(content, dict):
        raise InputError(str(path), "a sweep file must be a mapping", f"use the keys {list(SWEEP_KEYS)}")
    return typed(SweepFile, content, str(path))


@functools.lru_cache(maxsize=None)
def _schema_parser(cls: type):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls)
    return parser


_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted|does not accept option '([^']+)'")
_BAD_VALUE = re.compile(r'Parser key "([^"]+)"')


def typed(cls: type, content: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """`content` as a `cls` instance, checked by jsonargparse; its error as one line naming `where` and the key
    (`prefix` + key): an unknown key with the nearest valid one, or a value that is not of the key's kind."""
    known = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]
    section = f"{prefix.rstrip('.')} " if prefix else "sweep "
    try:
        namespace = _schema_parser(cls).parse_object(json.loads(json.dumps(content, default=str)))
    except ArgumentError as error:
        message = " ".join(str(error).split())
        unknown, bad = _NOT_ACCEPTED.search(message), _BAD_VALUE.search(message)
        if unknown:
            key = prefix + (unknown.group(1) or unknown.group(2))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise InputError(f"{where}: {key}", f"unknown {section}key", f"{hint}use {known}") from None
        if bad and bad.group(1) in {f.name for f in dataclasses.fields(cls)}:
            meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == bad.group(1))
            raise InputError(f"{where}: {prefix}{bad.group(1)}", f"must be {meta['kind']}, got "
                             f"{content.get(bad.group(1))!r}", f"e.g. {meta['example']}") from None
        raise InputError(where, message, "see the sweep file format (docs/sweeps.md; every key: the file-format reference of the docs site)") from None
    values = namespace.as_dict()   # plain data again (a `class_path` mapping under `Any` comes back a namespace)
    return cls(**{f.name: values.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name (its folder under OUTPUT/runs) and its own config overrides."""

    name: str
    overrides: dict[str, Any]


def member_label(run: SweepRun, choice: str, checkpoints: Sequence[str]) -> str:
    """A run's member in the leaderboard: its name, or NAME:CHECKPOINT when several checkpoints are chosen."""
    return run.name if len(checkpoints) == 1 else f"{run.name}:{choice}"


def _listed_runs(entries: list[Any] | None, where: str) -> list[SweepRun]:
    runs = []
    for index, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise InputError(f"{where}: runs[{index}]", "a run must be a mapping with a `name`",
                             "e.g. {name: balanced, data.policy: balanced}")
        name = entry["name"]
        overrides = {key: value for key, value in entry.items() if key != "name"}
        runs.append(SweepRun(str(name), check_overrides(overrides, f"{where}: run {name!r}")))
    return runs


def _grid_points(grid: dict[str, Any] | None, where: str) -> list[SweepRun]:
    """One SweepRun per point of the cartesian product; named `key-value_key-value` (last key part)."""
    if grid is None:
        return []
    if not grid:
        raise InputError(f"{where}: grid", "must be a non-empty mapping of dotted keys to value lists",
                         "e.g. grid: {seed_everything: [1, 2, 3]}")
    keys = list(check_overrides(grid, f"{where}: grid"))
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise InputError(f"{where}: grid: {key}", "must be a non-empty list of values", f"e.g. {key}: [1, 2]")
    points = []
    for values in itertools.product(*(grid[key] for key in keys)):
        name = "_".join(f"{key.rsplit('.', 1)[-1]}-{_name_part(value)}" for key, value in zip(keys, values))
        points.append(SweepRun(name, dict(zip(keys, values))))
    return points


def _name_part(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", cli_value(value)).strip("-") or "x"


def expand_runs(content: SweepFile | Mapping[str, Any], where: str) -> list[SweepRun]:
    """The listed runs, the grid points, or each listed run × each grid point; names checked and unique."""
    if isinstance(content, Mapping):
        content = typed(SweepFile, content, where)
    listed, points = _listed_runs(content.runs, where), _grid_points(content.grid, where)
    if listed and points:
        runs = [SweepRun(f"{run.name}_{point.name}", {**run.overrides, **point.overrides})
                for run in listed for point in points]
    else:
        runs = listed or points
    if not runs:
        raise InputError(where, "no runs", "list them under `runs:` (each with a name) or give a `grid:`")
    seen: set[str] = set()
    for run in runs:
        if not RUN_NAME.match(run.name):
            raise InputError(f"{where}: run {run.name!r}", "a run name must be a folder name",
                             "use letters, digits, '.', '_', '-' and '=' (no spaces or slashes)")
        if run.name in seen:
            raise InputError(f"{where}: run {run.name!r}", "two runs have this name", "give every run its own name")
        seen.add(run.name)
    return runs
