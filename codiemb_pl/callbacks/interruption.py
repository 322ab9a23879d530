"""Graceful interruption: SIGTERM or SIGINT during `fit` saves `last.ckpt` and ends the run cleanly.

A signal only sets a flag. At the end of the next optimizer step the flag is agreed across ranks
(all-reduce max, so every rank stops at the same step even when only one got the signal), the
checkpoint is written as `last.ckpt` in the ModelCheckpoint folder (durably, where
`--ckpt_path last` looks), and `TrainingInterrupted` ends `fit` without the end-of-fit validation,
export or fusion. The CLI turns it into one line and exit code 0. A second SIGINT aborts at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, None]
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Raised on every rank after the interruption checkpoint is saved; ends `fit` early on purpose."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, rank: int = 0, world_size: int = 1):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        who = f" (rank {rank} of {world_size})" if world_size > 1 else ""  # each rank's line shows its own stop step
        super().__init__(f"{signal_name} received{who}: stopped after optimizer step {step} and saved {checkpoint} "
                         "(resume with --ckpt_path last)")


class GracefulInterruption(pl.Callback):
    """On SIGTERM/SIGINT: finish the current optimizer step, save `last.ckpt`, stop every rank there.

    Handlers are installed when training starts (after Lightning installs its own SIGTERM handler,
    which this one replaces while training runs) and the previous ones are restored when it ends.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self.previous_handlers: dict[int, SignalHandler] = {}
        self.step_at_batch_start = 0

    # -- signal handling -----------------------------------------------------------------------------
    def handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Remember the signal; a repeated SIGINT falls back to the previous handler (abort now)."""
        if self.received is not None and signum == signal.SIGINT:
            previous = self.previous_handlers.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received = signum
        rank_zero_info(f"\n[codiemb] {signal.Signals(signum).name} received: saving a checkpoint after this "
                       "optimizer step (send SIGINT again to abort without saving)")

    def install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            self.previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self.handle_signal)

    def restore_handlers(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous_handlers = {}

    # -- Lightning hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        self.install_handlers()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step_at_batch_start:
            return  # mid-accumulation: stopping here would lose the accumulated gradients
        signum = self.agreed_signal(trainer)
        if signum is None:
            return
        path = self.save_last_checkpoint(trainer)
        raise TrainingInterrupted(signal.Signals(signum).name, trainer.global_step, path,
                                  rank=trainer.global_rank, world_size=trainer.world_size)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore_handlers()

    # -- helpers ---------------------------------------------------------------------------------------
    def agreed_signal(self, trainer: pl.Trainer) -> Optional[int]:
        """The signal any rank received (the largest number), identical on every rank; None if none did."""
        local = self.received or 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([local], dtype=torch.long, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        return local or None

    def save_last_checkpoint(self, trainer: pl.Trainer) -> Path:
        """Write the full training state to `<checkpoint dir>/last.ckpt` (durably under `codiemb fit`: a
        temporary name in that folder, flushed, then renamed, see `codiemb_pl.training.checkpoint_io`)."""
        owner = last_checkpoint_owner(trainer)
        folder, name = checkpoint_location(trainer, owner)
        final = folder / name
        if owner is not None:
            # recorded in the checkpoint, so the resumed ModelCheckpoint overwrites this file as its own `last`
            # instead of writing `last-v1.ckpt` beside it
            owner.last_model_path = str(final)
        trainer.save_checkpoint(final)  # collective: every rank contributes (e.g. its RNG state)
        rank_zero_info(f"[codiemb] saved {final} at step {trainer.global_step}")
        return final


def last_checkpoint_owner(trainer: pl.Trainer) -> Optional[ModelCheckpoint]:
    """The ModelCheckpoint whose folder receives `last.ckpt`: the first one with a folder, if any."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return callback
    return None


def checkpoint_location(trainer: pl.Trainer, owner: Optional[ModelCheckpoint]) -> tuple[Path, str]:
    """(folder, file name) of the `last` checkpoint: the owner's, else `<default_root_dir>/checkpoints/last.ckpt`."""
    if owner is not None:
        return Path(owner.dirpath), owner.CHECKPOINT_NAME_LAST + owner.FILE_EXTENSION
    return Path(trainer.default_root_dir) / "checkpoints", ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
