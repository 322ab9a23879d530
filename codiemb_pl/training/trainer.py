"""`DurableTrainer`: the Lightning Trainer of `codiemb fit | validate | test | predict`, with durable checkpoint folders.

Every checkpoint goes through `Trainer.save_checkpoint` (ModelCheckpoint, the interruption checkpoint,
OnExceptionCheckpoint, SLURM's requeue checkpoint). A checkpoint file is written by the strategy's
CheckpointIO, `checkpoint_io.DurableCheckpointIO` (the CLI installs it before `fit`). A strategy that writes
a folder instead (`writes_checkpoint_folders`) is given a hidden staging folder beside the final name
(`.NAME.tmp-XXXX`, picked by rank 0 and broadcast); once every rank has written its part, rank 0 flushes it,
writes the completeness marker (`checkpoint_io.seal_checkpoint_folder`) and renames it into place, replacing
a previous folder of that name (`atomic.move_into_place`). A failed save removes the staging folder (a full
disk becomes one `InputError` line); a kill leaves it, and the next run's start removes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from codiemb_pl.storage.atomic import move_into_place, raise_if_no_room
from codiemb_pl.training.checkpoint_io import is_local_path, seal_checkpoint_folder, staging_folder_name


def writes_checkpoint_folders(strategy: Any) -> bool:
    """Whether `strategy.save_checkpoint` writes a folder of its own format rather than one file through the
    CheckpointIO: DeepSpeed always; FSDP with `state_dict_type="sharded"`; `ModelParallelStrategy` (so
    `FSDP2Strategy`) with `save_distributed_checkpoint=True`. Lightning 2.6 keeps these two settings in
    private attributes, read here with the file-writing defaults."""
    if isinstance(strategy, DeepSpeedStrategy):
        return True
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy, "_state_dict_type", "full") == "sharded"
    if isinstance(strategy, ModelParallelStrategy):
        return bool(getattr(strategy, "_save_distributed_checkpoint", False))
    return False


class DurableTrainer(Trainer):
    """Lightning's Trainer whose folder checkpoints appear under their final name complete, or not at all."""

    def save_checkpoint(self, filepath: Any, weights_only: bool = False, storage_options: Optional[Any] = None) -> None:
        if not writes_checkpoint_folders(self.strategy) or not is_local_path(filepath):
            return super().save_checkpoint(filepath, weights_only=weights_only, storage_options=storage_options)
        final = Path(str(filepath))
        staging = Path(self.strategy.broadcast(str(staging_folder_name(final)) if self.is_global_zero else None))
        try:
            super().save_checkpoint(staging, weights_only=weights_only, storage_options=storage_options)  # every rank
            if self.is_global_zero:
                seal_checkpoint_folder(staging, self.global_step, self.current_epoch, weights_only)
                move_into_place(staging, final)
        except BaseException as error:
            if self.is_global_zero:
                shutil.rmtree(staging, ignore_errors=True)
            raise_if_no_room(error, final)
            raise
        self.strategy.barrier("codiemb-checkpoint-folder")
