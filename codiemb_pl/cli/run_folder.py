"""One output folder per run: every folder a config leaves unset follows `trainer.default_root_dir`.

With root `R` (`--trainer.default_root_dir`, default the working directory):

    logger whose save_dir is unset (e.g. codiemb_pl.training.loggers.CSVLogger) R/<name>/version_<n>
    lightning ModelCheckpoint whose dirpath is unset                        R/checkpoints
    codiemb_pl.callbacks.ExportEncoder whose dirpath is unset               R/model      (the callback)
    codiemb_pl.callbacks.CheckpointFusion whose dirpath is unset            R/fusion     (the callback)

`R/checkpoints` does not depend on the logger's version, so a resumed run (`--ckpt_path last`) finds the
`last.ckpt` of the run it resumes. A folder given explicitly is used as given (relative paths are
relative to the working directory, as everywhere in Lightning).

`fit_outputs(trainer)` is the one list of where a fit writes; from it `check_fit_outputs` refuses an
unwritable folder before training (`output_paths.check_writable_folder`), and
`remove_stale_temporaries_of_run` deletes, at the start of `fit`, the hidden temporary entries a killed run
left (`atomic.TEMPORARY_NAME`): any in the checkpoint folders and the fusion folders, those of the
export's own name beside it, and those of `LOG_FILES` in the log folders under the root (`log_folders`).
`checkpoint_folders(trainer)` lists where the run's checkpoints are (where `--ckpt_path last` looks).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

from lightning.pytorch.callbacks import ModelCheckpoint

from codiemb_pl.callbacks.export import ExportEncoder
from codiemb_pl.callbacks.fusion import CheckpointFusion
from codiemb_pl.callbacks.interruption import checkpoint_location, last_checkpoint_owner
from codiemb_pl.storage.atomic import remove_stale_temporaries
from codiemb_pl.storage.output_paths import FOLDER_FIX, check_writable_folder

INSIDE = "inside"
BESIDE = "beside"
LOG_FILES = frozenset({"config.yaml", "metrics.csv", "hparams.yaml"})
"""Files written through temporaries in a run's log folder: the CLI's resolved config (`cli.saved_config`) and
the CSV logger's (`training.loggers`)."""


def fill_unset_folders(trainer_config: Any) -> None:
    """Set, in a parsed `trainer` config (jsonargparse namespace), each logger's unset `save_dir` to the root
    and each ModelCheckpoint's unset `dirpath` to `<root>/checkpoints` (see the module docstring)."""
    root = trainer_config.get("default_root_dir") or os.getcwd()
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = _init_args(logger)
        if init_args is not None and "save_dir" in init_args and init_args.get("save_dir") is None:
            init_args["save_dir"] = root
    for callback in trainer_config.get("callbacks") or []:
        init_args = _init_args(callback)
        if init_args is not None and is_subclass_path(callback.get("class_path"), ModelCheckpoint) \
                and init_args.get("dirpath") is None:
            init_args["dirpath"] = os.path.join(root, "checkpoints")


def _init_args(entry: Any) -> Optional[Any]:
    """The `init_args` namespace of a `{class_path, init_args}` entry; None for anything else (True, objects)."""
    getter = getattr(entry, "get", None)
    if getter is None or not getter("class_path"):
        return None
    return getter("init_args")


def is_subclass_path(class_path: Optional[str], base: type) -> bool:
    """Whether the class a config's `class_path` names is `base` or a subclass of it (False when it does not
    import)."""
    module_name, _, class_name = (class_path or "").rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module_name), class_name), base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


class FitOutput(NamedTuple):
    """A place `fit` writes: `path`, named in messages by the setting `option`, and where a killed run's hidden
    temporaries of it lie: `INSIDE` the folder (the run alone writes there), `BESIDE` it (only the entry
    `path.name` of its parent is the run's), or None (a folder shared with others: the run root, a logger's)."""

    option: str
    path: Path
    temporaries: Optional[str] = None


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The folders of the run's checkpoints: each ModelCheckpoint's `dirpath`, and the folder of the interruption
    checkpoint (`<default_root_dir>/checkpoints` when no ModelCheckpoint has a folder), without repeats."""
    folders = [Path(callback.dirpath) for callback in trainer.checkpoint_callbacks
               if isinstance(callback, ModelCheckpoint) and callback.dirpath]
    folders.append(checkpoint_location(trainer, last_checkpoint_owner(trainer))[0])
    return list(dict.fromkeys(folders))


def last_checkpoint_paths(trainer: Any) -> list[Path]:
    """The files each ModelCheckpoint with `save_last=True` keeps its last checkpoint in (`<dirpath>/last.ckpt` by
    default; none for a `CHECKPOINT_NAME_LAST` with format fields), without repeats."""
    paths = [Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
             for callback in trainer.checkpoint_callbacks
             if isinstance(callback, ModelCheckpoint) and callback.dirpath and callback.save_last is True
             and "{" not in callback.CHECKPOINT_NAME_LAST]
    return list(dict.fromkeys(paths))


def fit_outputs(trainer: Any) -> list[FitOutput]:
    """Everything `fit` writes into: the run root, each logger's save_dir, the checkpoint folders, the export
    (and adapter) folder, the fusion folder with its snapshots and candidates."""
    outputs = [FitOutput("trainer.default_root_dir", Path(trainer.default_root_dir))]
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            outputs.append(FitOutput(f"{type(logger).__name__} save_dir", Path(save_dir)))
    given = {Path(callback.dirpath) for callback in trainer.checkpoint_callbacks
             if isinstance(callback, ModelCheckpoint) and callback.dirpath}
    outputs += [FitOutput("ModelCheckpoint dirpath" if folder in given else "trainer.default_root_dir", folder, INSIDE)
                for folder in checkpoint_folders(trainer)]
    for callback in trainer.callbacks:
        if isinstance(callback, ExportEncoder):
            outputs.append(FitOutput("ExportEncoder dirpath", callback.output_dir(trainer), BESIDE))
            if callback.adapter_dirpath:
                outputs.append(FitOutput("ExportEncoder adapter_dirpath", Path(callback.adapter_dirpath), BESIDE))
        elif isinstance(callback, CheckpointFusion):
            root = callback.root(trainer)
            outputs += [FitOutput("CheckpointFusion dirpath", folder, INSIDE)
                        for folder in (root, root / "snapshots", root / "candidates")]
    return outputs


def check_fit_outputs(trainer: Any) -> None:
    """Refuse a fit whose output folders cannot be written, before any data is read or training starts."""
    for output in fit_outputs(trainer):
        check_writable_folder(output.path, output.option, f"{FOLDER_FIX}: set --trainer.default_root_dir (every "
                                                          "unset folder follows it) or this folder's own option")


def log_folders(trainer: Any) -> list[Path]:
    """Where this run and the runs it resumes wrote their `LOG_FILES` inside the run root: the root (`config.yaml`
    without a logger) and every `version_*` folder of each logger's `root_dir` that lies under the root (a
    resumed run logs to a new version; a logger folder outside the root may be another run's)."""
    root = Path(trainer.default_root_dir).resolve()
    folders = [root]
    for logger in trainer.loggers:
        logger_root = getattr(logger, "root_dir", None)
        if logger_root and Path(logger_root).resolve().is_relative_to(root) and Path(logger_root).is_dir():
            folders += sorted(path for path in Path(logger_root).glob("version_*") if path.is_dir())
    return folders


def remove_stale_temporaries_of_run(trainer: Any) -> str:
    """Delete the temporaries a killed run left where this one writes (call on global rank 0 before `fit`,
    with the run folder to itself); returns the line saying what went, empty when nothing did."""
    removed = []
    for output in fit_outputs(trainer):
        if output.temporaries == INSIDE:
            removed += remove_stale_temporaries(output.path, None)
        elif output.temporaries == BESIDE:
            removed += remove_stale_temporaries(output.path.parent, {output.path.name})
    for folder in log_folders(trainer):
        removed += remove_stale_temporaries(folder, LOG_FILES)
    if not removed:
        return ""
    return (f"[codiemb] removed {len(removed)} temporary file(s)/folder(s) an interrupted run left: "
            + ", ".join(str(path) for path in removed))
