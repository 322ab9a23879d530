"""Training dashboards: per-task steps and samples, learning rate, gradient norm, the resolved config,
and helpers that put fusion results (leaderboard table, weight histograms) and figures into W&B.

`TrainingMonitor` logs through `LightningModule.log`, so every attached logger (CSV, W&B, ...) gets
the same keys. Every value it logs is identical on all ranks by construction (the sampler gives each
optimizer step one task on every rank; gradients are already all-reduced when the optimizer step
starts; the learning rate comes from the same schedule), so it logs with `sync_dist=False` and runs
no collective at all: it cannot make DDP ranks wait for each other.

The helper functions do nothing when no `WandbLogger` is attached (or `wandb` is not installed), and
only rank 0 writes (Lightning's W&B logger is rank-zero-only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

TASKS = ("ir", "sts", "mixed", "joint")
CONFIG_FILE_NAME = "config.yaml"
CLI_CONFIG_KEY = "cli"


class TrainingMonitor(pl.Callback):
    """Log `train/<task>/optimizer_steps`, `train/<task>/global_samples_seen`, `train/lr` and
    `train/grad_norm`; put the resolved LightningCLI config into the W&B run config.

    Args:
        config_path: the resolved config to log to W&B; default `<trainer.log_dir>/config.yaml`, the file
            LightningCLI saves (when absent, only the module's and data module's hyperparameters are logged,
            as Lightning does anyway).
        log_grad_norm: compute the global L2 norm of all gradients before each optimizer step.
    """

    def __init__(self, config_path: Optional[str] = None, log_grad_norm: bool = True):
        self.config_path = config_path
        self.log_grad_norm = log_grad_norm
        self.optimizer_steps = {task: 0 for task in TASKS}
        self.global_samples = {task: 0 for task in TASKS}
        self._current_task: Optional[str] = None

    # -- checkpointed counters (a resumed run continues its curves) ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": dict(self.optimizer_steps), "global_samples": dict(self.global_samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer_steps.update(state_dict.get("optimizer_steps", {}))
        self.global_samples.update(state_dict.get("global_samples", {}))

    # -- hooks --------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = read_cli_config(self.config_path or _default_config_path(trainer))
        if config is not None:
            log_run_config(trainer.loggers, {CLI_CONFIG_KEY: config})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._current_task = batch.get("task") if isinstance(batch, Mapping) else None
        for task, size in batch_sizes_by_task(batch).items():
            self.global_samples[task] += size * trainer.world_size  # every rank holds an equal slice

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._current_task in self.optimizer_steps:
            self.optimizer_steps[self._current_task] += 1
        values = {"train/lr": float(optimizer.param_groups[0]["lr"])}
        if self.log_grad_norm:
            values["train/grad_norm"] = global_grad_norm(pl_module.parameters())
        for task in self._tasks_seen():
            values[f"train/{task}/optimizer_steps"] = float(self.optimizer_steps[task])
            values[f"train/{task}/global_samples_seen"] = float(self.global_samples[task])
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)

    def _tasks_seen(self) -> list[str]:
        return [task for task in TASKS if self.optimizer_steps[task] or self.global_samples[task]]


def batch_sizes_by_task(batch: Any) -> dict[str, int]:
    """Items per task in one micro-batch (this rank): IR queries, STS pairs; a `mixed` or `joint` batch has both."""
    if not isinstance(batch, Mapping):
        return {}
    task = batch.get("task")
    if task == "ir":
        return {"ir": int(batch["query"]["input_ids"].shape[0])}
    if task == "sts":
        return {"sts": int(batch["scores"].shape[0])}
    if task in ("mixed", "joint"):
        sizes = {}
        for part in ("ir", "sts"):
            if batch.get(part) is not None:
                sizes.update(batch_sizes_by_task(batch[part]))
        return sizes
    return {}


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients together (parameters without a gradient are skipped)."""
    norms = [p.grad.detach().float().norm(2) for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms), 2))


def _default_config_path(trainer: pl.Trainer) -> Optional[Path]:
    log_dir = trainer.log_dir
    return Path(log_dir) / CONFIG_FILE_NAME if log_dir else None


def read_cli_config(path: Optional[str | Path]) -> Optional[dict[str, Any]]:
    """The YAML config LightningCLI saved, as a dict; None when there is no such file."""
    if path is None or not Path(path).is_file():
        return None
    import yaml

    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else None


# -- W&B helpers: no-ops without a WandbLogger -----------------------------------------------------------
def wandb_loggers(loggers: Sequence[Logger] | Logger | None) -> list[Logger]:
    """The `WandbLogger`s among `loggers` (a trainer's `trainer.loggers`, one logger, or None)."""
    if loggers is None:
        return []
    if isinstance(loggers, Logger):
        loggers = [loggers]
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is a dependency, but keep logging optional
        return []
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


@rank_zero_only
def log_run_config(loggers: Sequence[Logger] | Logger | None, config: Mapping[str, Any]) -> bool:
    """Merge `config` into each W&B run's config; True if a W&B run received it."""
    targets = wandb_loggers(loggers)
    for logger in targets:
        logger.experiment.config.update(dict(config), allow_val_change=True)
    return bool(targets)


@rank_zero_only
def log_leaderboard(trainer_loggers: Sequence[Logger] | Logger | None, rows: list[dict[str, Any]],
                    key: str = "fusion/leaderboard") -> bool:
    """Log fusion results as a `wandb.Table` (one row per candidate; columns = union of the row keys in
    first-seen order; lists and dicts are shown as text). True if a W&B run received it."""
    targets = wandb_loggers(trainer_loggers)
    if not targets or not rows:
        return False
    columns: list[str] = []
    for row in rows:
        columns.extend(name for name in row if name not in columns)
    data = [[_table_cell(row.get(name)) for name in columns] for row in rows]
    for logger in targets:
        logger.log_table(key=key, columns=columns, data=data)
    return True


@rank_zero_only
def log_weight_histograms(trainer_loggers: Sequence[Logger] | Logger | None,
                          weights: Mapping[str, Any], prefix: str = "fusion/weights",
                          step: Optional[int] = None) -> bool:
    """Log one `wandb.Histogram` per entry of `weights` (name -> tensor / array / list of numbers),
    under `<prefix>/<name>`. True if a W&B run received them."""
    targets = wandb_loggers(trainer_loggers)
    if not targets or not weights:
        return False
    import wandb

    histograms = {f"{prefix}/{name}": wandb.Histogram(_as_numpy(values)) for name, values in weights.items()}
    for logger in targets:
        logger.log_metrics(histograms, step=step)
    return True


@rank_zero_only
def log_figures(trainer_loggers: Sequence[Logger] | Logger | None, figures: Mapping[str, Any],
                prefix: str = "geometry", step: Optional[int] = None) -> bool:
    """Log matplotlib figures (or image arrays / paths) as W&B images under `<prefix>/<name>`."""
    targets = wandb_loggers(trainer_loggers)
    if not targets or not figures:
        return False
    for logger in targets:
        for name, figure in figures.items():
            logger.log_image(key=f"{prefix}/{name}", images=[figure], step=step)
    return True


def _as_numpy(values: Any):
    if isinstance(values, torch.Tensor):
        return values.detach().float().flatten().cpu().numpy()
    import numpy as np

    return np.asarray(values, dtype=np.float64).ravel()


def _table_cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    import json

    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        rank_zero_warn(f"[codiemb] leaderboard cell {value!r} shown as text")
        return str(value)
