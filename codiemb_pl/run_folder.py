"""One output folder per run: every folder a config leaves unset follows `trainer.default_root_dir`.

With root `R` (`--trainer.default_root_dir`, default the working directory):

    logger whose save_dir is unset (e.g. codiemb_pl.run_folder.CSVLogger)   R/<name>/version_<n>
    lightning ModelCheckpoint whose dirpath is unset                        R/checkpoints
    codiemb_pl.callbacks.ExportEncoder whose dirpath is unset               R/model      (the callback)
    codiemb_pl.callbacks.CheckpointFusion whose dirpath is unset            R/fusion     (the callback)

`R/checkpoints` does not depend on the logger's version, so a resumed run (`--ckpt_path last`) finds the
`last.ckpt` of the run it resumes. A folder given explicitly is used as given (relative paths are
relative to the working directory, as everywhere in Lightning).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Union

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with `save_dir` optional: unset, the CLI puts it at `trainer.default_root_dir`
    (the working directory when used without the CLI). Logs go to `<save_dir>/<name>/version_<n>/metrics.csv`."""

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "logs",
                 version: Optional[Union[int, str]] = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, version=version,
                         prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)


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
        if init_args is not None and _is_subclass(callback.get("class_path"), ModelCheckpoint) \
                and init_args.get("dirpath") is None:
            init_args["dirpath"] = os.path.join(root, "checkpoints")


def _init_args(entry: Any) -> Optional[Any]:
    """The `init_args` namespace of a `{class_path, init_args}` entry; None for anything else (True, objects)."""
    getter = getattr(entry, "get", None)
    if getter is None or not getter("class_path"):
        return None
    return getter("init_args")


def _is_subclass(class_path: Optional[str], base: type) -> bool:
    module_name, _, class_name = (class_path or "").rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module_name), class_name), base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
