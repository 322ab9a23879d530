"""Loggers whose output folder follows the run (`save_dir` unset means `trainer.default_root_dir`, filled in by
the CLI, `codiemb_pl.cli.run_folder.fill_unset_folders`) and whose files survive a kill.

Lightning's CSV writer appends rows to `metrics.csv` in place, truncates it to rewrite it whenever a new metric
appears, and writes `hparams.yaml` in place: a run killed there left a truncated file and lost every row logged
before (found by `benchmarks/kill_anywhere.py`). `DurableExperimentWriter` replaces each file atomically
(`storage.atomic.atomic_file`): the rows already on disk and the new ones are written to a temporary beside
`metrics.csv`, flushed and renamed onto it. Remote log folders (fsspec URLs) keep Lightning's writes.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Optional, Union

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from codiemb_pl.storage.atomic import atomic_file


class DurableExperimentWriter(ExperimentWriter):
    """Lightning's CSV `ExperimentWriter` with `metrics.csv` and `hparams.yaml` replaced atomically."""

    def _remote(self) -> bool:
        return "://" in str(self.log_dir)

    def save(self) -> None:
        """Write the rows recorded since the last save after those in `metrics.csv`, under one header naming every
        metric so far (cost: the file is read and rewritten, once per flush)."""
        if not self.metrics or self._remote():
            return super().save()
        self._record_new_keys()
        previous: list[dict[str, str]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as handle:
                previous = list(csv.DictReader(handle))
        with atomic_file(self.metrics_file_path) as temporary:
            with open(temporary, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(previous)
                writer.writerows(self.metrics)
        self.metrics = []

    def log_hparams(self, params: dict[str, Any]) -> None:
        if self._remote():
            return super().log_hparams(params)
        self.hparams.update(params)
        with atomic_file(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as temporary:
            save_hparams_to_yaml(str(temporary), self.hparams)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with `save_dir` optional (unset, the CLI puts it at `trainer.default_root_dir`; the
    working directory when used without the CLI) and its files written atomically (`DurableExperimentWriter`).
    Logs go to `<save_dir>/<name>/version_<n>/metrics.csv`."""

    def __init__(self, save_dir: Optional[str] = None, name: Optional[str] = "logs",
                 version: Optional[Union[int, str]] = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, version=version,
                         prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> DurableExperimentWriter:
        """The writer, created on first use (as Lightning's, with the durable writer)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = DurableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
