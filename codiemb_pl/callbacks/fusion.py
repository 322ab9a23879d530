"""Fuse the checkpoints of a run when `fit` ends, score every candidate, export the winner.

`CheckpointFusion` writes θ0 (the encoder before training) to `<dirpath>/snapshots/base.safetensors`
in `setup`, then encoder-only safetensors snapshots at the moments `collect` names:

    epoch      end of every training epoch          last       end of training
    best_ir    each new best `val/ir_avg`            best_sts   each new best `val/sts_avg`
    best       each new best `val/avg`               every_n_steps: k   every k optimizer steps

(one file per step, labels joined when moments coincide, superseded bests deleted). A run resumed from a
checkpoint of its final step (killed during its export or fusion) skips Lightning's training loop, so
`on_train_end` never fires there: the `last` snapshot is then the restored weights, written when the
checkpoint is restored (`on_load_checkpoint`; removed again if training goes on) and labelled when `fit`
ends, as in the uninterrupted run. At the end of
`fit`, rank 0 merges them with every configured method (`workflows.fusion`), scores the base, every
snapshot and every merge with the validation suite on `datamodule.val_sets`, prints the leaderboard,
logs `fusion/<candidate>/<metric>` to the trainer's loggers (and a `fusion/leaderboard` table to
W&B), writes `leaderboard.json` / `.md` and exports the best candidate by `metric` to
`<dirpath>/model` (sentence-transformers folder with a model card: method, inputs, weights,
parameters, scores). Other ranks wait at a barrier. The module's weights are restored afterwards.
An unset `dirpath` is `<trainer.default_root_dir>/fusion`, so `--trainer.default_root_dir` moves it.

Under FSDP2 (`configs/trainer/fsdp2.yaml`) each rank holds 1/W of the weights, and the sharded module runs
only with every rank taking part: each snapshot is written from the consolidated full weights (every rank
enters the gather, `sharding.consolidated_weights`, rank 0 writes), and the fusion and scoring run on rank 0
with an ordinary, unsharded `TextEncoder` of the same base model and settings, built from the consolidated
weights (`unsharded_encoder`), while the other ranks wait. The sharded module is not touched. Under LoRA,
snapshots hold the merged weights `W0 + s·B·A` under the base names in either case.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from codiemb_pl.callbacks.export import add_training_prompts
from codiemb_pl.callbacks.monitoring import log_leaderboard
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.writer import save_state_dict
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.lora import merged_weights
from codiemb_pl.training.sharding import consolidated_weights, is_fsdp2_sharded
from codiemb_pl.workflows.encoders import load_weights
from codiemb_pl.workflows.fusion.export import fuse_and_export
from codiemb_pl.workflows.fusion.leaderboard import DEFAULT_METRIC, Leaderboard, write_leaderboard
from codiemb_pl.workflows.fusion.scoring import FusionInputs
from codiemb_pl.workflows.fusion.settings import check_metric, parse_methods

MOMENTS = ("epoch", "last", "best_ir", "best_sts", "best")
BEST_MONITORS = {"best_ir": "val/ir_avg", "best_sts": "val/sts_avg", "best": "val/avg"}
DEFAULT_METHODS: list[dict[str, Any]] = [
    {"method": "delta_guided", "params": {"gamma": 1.0}},
    {"method": "uniform_soup"},
    {"method": "ties", "params": {"density": 0.2}},
    {"method": "task_arithmetic", "params": {"scale": 1.0}},
    {"method": "multi_slerp"},
]


def save_encoder_weights(pl_module: pl.LightningModule, path: Path) -> None:
    """The encoder's transformer weights (Hugging Face names) as safetensors, written atomically."""
    _, weights = merged_weights(pl_module.encoder.model)  # LoRA: base + s·B·A under the base names
    save_state_dict({key: value.detach() for key, value in weights.items()}, path)


def write_encoder_weights(trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
    """`save_encoder_weights` on rank 0. Every rank must call it: under FSDP2 the full weights are first
    gathered to rank 0 (a collective); otherwise the other ranks do nothing."""
    with consolidated_weights(pl_module.encoder.model):
        if trainer.is_global_zero:
            save_encoder_weights(pl_module, path)


def unsharded_encoder(pl_module: pl.LightningModule, device) -> TextEncoder:
    """A plain `TextEncoder` (no sharding, no adapters) of the module encoder's base model and settings,
    holding its current weights (LoRA merged in), on `device`. Under FSDP2 call it on rank 0 inside
    `sharding.consolidated_weights(pl_module.encoder.model)`, where those weights are the gathered ones."""
    source = pl_module.encoder
    _, weights = merged_weights(source.model)
    encoder = TextEncoder(source.name_or_path, pooling=source.pooling, normalize=source.normalize,
                          max_seq_length=source.max_seq_length, prompts=dict(source.prompts),
                          include_prompt=source.include_prompt, num_layers=source.kept_layers,
                          trust_remote_code=bool(dict(getattr(pl_module, "hparams", {})).get("trust_remote_code")))
    encoder.default_prompt_name, encoder.do_lower_case = source.default_prompt_name, source.do_lower_case
    encoder.matryoshka_dims = list(source.matryoshka_dims)
    encoder.model.load_state_dict({key: value.detach() for key, value in weights.items()}, strict=True)
    return encoder.to(device)


class CheckpointFusion(pl.Callback):
    """Collect encoder snapshots during `fit`, fuse them at the end, export the best candidate.

    Args:
        dirpath: output folder (snapshots/, candidates/, leaderboard.json/.md, model/); default
            `<trainer.default_root_dir>/fusion`.
        methods: merge list, each `{method, params, weights, name}` (see `workflows.fusion.settings`).
        collect: moments to snapshot: epoch, last, best_ir, best_sts, best.
        every_n_steps: also snapshot every k optimizer steps (0 = off).
        metric: validation metric that picks the winner (higher is better).
        export: write the winner as a sentence-transformers folder to `<dirpath>/model`.
        eval_batch_size: texts per encoding batch when scoring candidates.
    """

    def __init__(self, dirpath: Optional[str] = None, methods: Optional[list[dict[str, Any]]] = None,
                 collect: Optional[list[str]] = None, every_n_steps: int = 0, metric: str = DEFAULT_METRIC,
                 export: bool = True, eval_batch_size: int = 64):
        self.methods = parse_methods(DEFAULT_METHODS if methods is None else methods, "CheckpointFusion.methods")
        self.collect = list(collect) if collect is not None else ["epoch"]
        unknown = sorted(set(self.collect) - set(MOMENTS))
        if unknown:
            raise InputError("CheckpointFusion.collect", f"unknown moment(s) {unknown}", f"use {list(MOMENTS)}")
        if every_n_steps < 0:
            raise InputError("CheckpointFusion.every_n_steps", f"{every_n_steps} < 0", "use 0 (off) or k > 0")
        self.dirpath, self.every_n_steps, self.metric = dirpath, int(every_n_steps), metric
        self.export, self.eval_batch_size = export, int(eval_batch_size)
        self.snapshots: dict[int, list[str]] = {}      # global step -> labels
        self.best_values: dict[str, float] = {}
        self.leaderboard: Optional[Leaderboard] = None
        self.trained = False                           # this fit ran its training loop (on_train_start)
        self.restored_step: Optional[int] = None       # the step of the restored weights written as `last`

    # -- paths ---------------------------------------------------------------------------------------
    def root(self, trainer: pl.Trainer) -> Path:
        """`dirpath`, or `<trainer.default_root_dir>/fusion` when unset."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "fusion"

    def snapshot_path(self, trainer: pl.Trainer, step: int) -> Path:
        return self.root(trainer) / "snapshots" / f"step{step:07d}.safetensors"

    def base_path(self, trainer: pl.Trainer) -> Path:
        return self.root(trainer) / "snapshots" / "base.safetensors"

    # -- collecting ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """θ0 is written before any checkpoint is restored, and kept when a run resumes. (FSDP2 shards the
        module later, in `configure_model`, so the gather below is a no-op unless it is sharded already.)"""
        if stage != "fit":
            return
        self.check_metric(trainer, pl_module)
        base = self.base_path(trainer)
        with consolidated_weights(pl_module.encoder.model):
            if trainer.is_global_zero and not base.exists():
                base.parent.mkdir(parents=True, exist_ok=True)
                save_encoder_weights(pl_module, base)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The exported winner carries the training instructions as prompts (`query`, ...), as ExportEncoder's
        folder does, also when the run has no ExportEncoder. `trained` turns true when the training loop starts."""
        self.trained = False
        add_training_prompts(pl_module.encoder, getattr(trainer, "datamodule", None))

    def check_metric(self, trainer: pl.Trainer, pl_module: Optional[pl.LightningModule] = None) -> None:
        """`metric` must be one the run's `data.val` sets give (at full width, or `@m` at a Matryoshka width below
        it), or the fusion would find no winner after training: one line (InputError) at set-up instead. Without
        validation sets fusion is skipped anyway (a warning)."""
        sources = list(getattr(getattr(trainer, "datamodule", None), "val_sources", None) or [])
        widths = getattr(pl_module, "smaller_trained_widths", None)
        if sources:
            check_metric(self.metric, {source.name: source.task for source in sources}, "CheckpointFusion.metric",
                         dims=widths() if widths is not None else ())

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str) -> None:
        """Every rank keeps the same bookkeeping and calls this at the same moments (a collective under FSDP2,
        then a barrier); rank 0 writes the file."""
        step = trainer.global_step
        if step == 0:
            return
        if step not in self.snapshots:
            write_encoder_weights(trainer, pl_module, self.snapshot_path(trainer, step))
        if label not in self.snapshots.setdefault(step, []):
            self.snapshots[step].append(label)
        trainer.strategy.barrier("codiemb-fusion-snapshot")

    def _drop_label(self, trainer: pl.Trainer, label: str) -> None:
        for step, labels in list(self.snapshots.items()):
            if label in labels:
                labels.remove(label)
                if not labels:
                    del self.snapshots[step]
                    if trainer.is_global_zero:
                        self.snapshot_path(trainer, step).unlink(missing_ok=True)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """The module holds the restored weights now. If they may become the `last` snapshot (a checkpoint of the
        final step resumes without training, see the module docstring) and their step has none, write it."""
        step = int(checkpoint.get("global_step") or 0)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if "last" not in self.collect or trainer.state.fn != TrainerFn.FITTING or step == 0 \
                or str(step) in (state.get("snapshots") or {}):
            return
        write_encoder_weights(trainer, pl_module, self.snapshot_path(trainer, step))   # every rank (FSDP2 gather)
        self.restored_step = step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training goes on: the restored weights will not be the last ones, so their provisional snapshot goes."""
        self.trained = True
        if self.restored_step is not None and self.restored_step not in self.snapshots and trainer.is_global_zero:
            self.snapshot_path(trainer, self.restored_step).unlink(missing_ok=True)
        self.restored_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and not self._has(step, f"step{step}"):
            self._snapshot(trainer, pl_module, f"step{step}")

    def _has(self, step: int, label: str) -> bool:
        return label in self.snapshots.get(step, [])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step == 0 or trainer.state.fn != TrainerFn.FITTING:
            return
        for moment in (m for m in self.collect if m in BEST_MONITORS):
            value = trainer.callback_metrics.get(BEST_MONITORS[moment])
            if value is None or not math.isfinite(float(value)):
                continue
            if float(value) > self.best_values.get(moment, -math.inf):
                self.best_values[moment] = float(value)
                self._drop_label(trainer, moment)
                self._snapshot(trainer, pl_module, moment)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "epoch" in self.collect:
            self._snapshot(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "last" in self.collect:
            self._snapshot(trainer, pl_module, "last")

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": {str(k): list(v) for k, v in self.snapshots.items()}, "best_values": dict(self.best_values)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = {int(k): list(v) for k, v in state_dict.get("snapshots", {}).items()}
        self.best_values = dict(state_dict.get("best_values", {}))

    # -- fusing --------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self.trained and "last" in self.collect and step and not self._has(step, "last") \
                and (step in self.snapshots or step == self.restored_step):   # resumed at the end: no on_train_end
            self.snapshots.setdefault(step, []).append("last")
        if is_fsdp2_sharded(pl_module.encoder.model):   # rank 0 alone cannot run the sharded module
            with consolidated_weights(pl_module.encoder.model):   # every rank gathers, rank 0 keeps the weights
                encoder = unsharded_encoder(pl_module, trainer.strategy.root_device) if trainer.is_global_zero else None
            if encoder is not None:
                self.fuse(trainer, pl_module, encoder)
                del encoder
        elif trainer.is_global_zero:
            self.fuse(trainer, pl_module)
        trainer.strategy.barrier("codiemb-fusion")

    def fuse(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
             encoder: Optional[TextEncoder] = None) -> Optional[Leaderboard]:
        """Merge, score and export on this process with `encoder` (default: the module's own, whose weights are
        restored afterwards; under FSDP2 an `unsharded_encoder`, left holding the last weights it scored), through
        `workflows.fusion.export.fuse_and_export`, the path sweeps and BOOM take too."""
        datamodule = trainer.datamodule
        val_sets = list(getattr(datamodule, "val_sets", []) or [])
        snapshots = [(step, labels) for step, labels in sorted(self.snapshots.items())
                     if self.snapshot_path(trainer, step).exists()]
        if not val_sets or not snapshots:
            rank_zero_warn("[codiemb] fusion skipped: " + ("no validation sets" if not val_sets else "no snapshots"))
            return None
        root = self.root(trainer)
        own = encoder is None
        current = root / "snapshots" / "current.safetensors"
        if own:
            save_encoder_weights(pl_module, current)
            encoder = pl_module.encoder
        hparams = dict(getattr(pl_module, "hparams", {}))
        inputs = FusionInputs(
            base=self.base_path(trainer),
            checkpoints=[("+".join(labels), self.snapshot_path(trainer, step)) for step, labels in snapshots],
            model_folder=str(encoder.name_or_path),
            probe_sources=list(getattr(datamodule, "train_sources", []) or []),
            encoder_settings={"pooling": encoder.pooling, "normalize": encoder.normalize,
                              "max_seq_length": encoder.max_seq_length,
                              **({"num_layers": encoder.kept_layers} if encoder.kept_layers is not None else {})},
            seed=int(hparams.get("seed", 0) or 0))
        try:
            outcome = fuse_and_export(inputs, self.methods, encoder, sets=val_sets, eval_batch_size=self.eval_batch_size,
                                      metric=self.metric, workdir=root / "candidates",
                                      heading=f"fusion leaderboard (ranked by {self.metric})",
                                      export_folder=root / "model" if self.export else None,
                                      log=rank_zero_info, show=lambda text: print(text, flush=True))
            board = self.leaderboard = outcome.board
            self._report(trainer, board, root)
            if outcome.exported is not None:
                winner = outcome.chosen
                untrained = ", the base model itself: see the note above" if winner.kind == "base" else ""
                rank_zero_info(f"[codiemb] fusion: exported {winner.name} ({self.metric} "
                               f"{winner.metrics[self.metric]:.4f}{untrained}) to {outcome.exported.resolve()}")
        finally:
            if own:
                load_weights(encoder, current)
                current.unlink(missing_ok=True)
        return board

    def _report(self, trainer: pl.Trainer, board: Leaderboard, root: Path) -> None:
        """The leaderboard files, each candidate's metrics to every logger, and a W&B table."""
        write_leaderboard(root, board, "Fusion leaderboard")
        for logger in trainer.loggers:
            for candidate in board.candidates:
                metrics = {f"fusion/{candidate.name}/{key}": value for key, value in candidate.metrics.items()}
                if metrics:
                    logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        log_leaderboard(trainer.loggers, board.table_rows())
