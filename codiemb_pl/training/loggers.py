"""Loggers whose output folder follows the run: `save_dir` unset means `trainer.default_root_dir`
(filled in by the CLI, `codiemb_pl.cli.run_folder.fill_unset_folders`)."""

from __future__ import annotations

import os
from typing import Optional, Union

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with `save_dir` optional: unset, the CLI puts it at `trainer.default_root_dir`
    (the working directory when used without the CLI). Logs go to `<save_dir>/<name>/version_<n>/metrics.csv`."""

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "logs",
                 version: Optional[Union[int, str]] = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, version=version,
                         prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)
