"""What a sweep run's folder says about it: finished (its export complete and its fit returned), and made with
which settings (`OUTPUT/runs/NAME/sweep_run.json`: the run's name, `codiemb fit` arguments, overrides, resolved
config and `finished`: false from the moment the run starts training until its fit has returned with its
outputs complete; the export is written before the fit ends, its fusion and last validation follow, so the
export alone does not mean finished).

A run is reused (skipped when finished, resumed from its newest complete checkpoint when not) only when
`same_settings` holds:
the recorded command is the run's, and the recorded config is the run's resolved config as this version reads
it. Records written by an older version still match when only the version changed: class and module paths
that moved in 0.2 are rewritten (`cli.moved_paths.normalise_paths`), and the recorded config is resolved again
through today's parser, so a key added since (e.g. `data.verify_cache`) takes its default there: equal when the
run leaves it at the default, different when the run sets another value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.cli.fit import FitConfigParser
from codiemb_pl.cli.moved_paths import normalise_paths
from codiemb_pl.errors import InputError
from codiemb_pl.storage.atomic import atomic_write_text

RUN_RECORD = "sweep_run.json"


def is_finished_export(folder: str | Path) -> bool:
    """A complete sentence-transformers export: modules.json and weights (exports are written atomically)."""
    folder = Path(folder)
    return (folder / "modules.json").is_file() and any(folder.glob("*.safetensors"))


def read_record(folder: Path) -> Optional[dict[str, Any]]:
    """The run folder's `sweep_run.json`, or None (absent or unreadable: the run is then not reused)."""
    path = folder / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def write_record(folder: Path, name: str, command: Sequence[str], overrides: Mapping[str, Any],
                 config: Optional[Mapping[str, Any]], finished: bool = False) -> None:
    """Record (atomically) what the run is trained with, and whether its fit has returned (`finished`)."""
    atomic_write_text(folder / RUN_RECORD, json.dumps({"name": name, "command": list(command),
                                                       "overrides": dict(overrides), "config": config,
                                                       "finished": finished}, indent=2) + "\n")


def record_says_unfinished(folder: Path) -> bool:
    """The run folder's record says its fit has not returned (a record without the key, written before it was
    kept, or no record at all, e.g. a run trained from `--print-commands`: judged by its outputs alone)."""
    record = read_record(folder)
    return record is not None and record.get("finished") is False


def run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints (`*.ckpt` files and folders, hidden temporaries excluded) anywhere in a run folder."""
    return sorted(path for path in folder.rglob("*.ckpt")
                  if not any(part.startswith(".") for part in path.relative_to(folder).parts))


def same_settings(record: Mapping[str, Any], command: Sequence[str], config: Optional[Mapping[str, Any]],
                  parser: FitConfigParser) -> bool:
    """The record's command is `command` and its config is `config` (records written before configs were kept
    hold none), both with moved class paths rewritten; a config key added since the record was written counts
    only when the run sets it to other than its default."""
    if normalise_paths(list(record.get("command") or [])) != list(command):
        return False
    recorded = record.get("config")
    if recorded is None or config is None:
        return True
    current = json.loads(json.dumps(config))
    recorded = normalise_paths(recorded)
    if recorded == current:
        return True
    try:   # as this version reads the recorded config: keys added since at their defaults
        return parser.resolve(recorded) == current
    except InputError:   # a key this version no longer has, a class that no longer imports: not the same run
        return False
