"""Export the trained encoder as a sentence-transformers folder when `fit` ends.

With `from_best=True` and a ModelCheckpoint that monitors a metric, the best checkpoint's weights are
loaded before export; otherwise the final weights are exported. The folder is written atomically and
carries a model card (README.md, see `codiemb_pl.model.card`): base model, data, sampler policy, losses,
the validation metrics of the exported weights and how to load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.sources import load_lightning_checkpoint
from codiemb_pl.model.card import build_model_card, encoder_card_fields
from codiemb_pl.model.lora import task_specialist_weights
from codiemb_pl.model.task_lora import has_task_adapters
from codiemb_pl.model.prompts import include_prompt_for, instruction_prompts
from codiemb_pl.training.sharding import consolidated_weights


class ExportEncoder(pl.Callback):
    """Write the encoder to `dirpath` (sentence-transformers layout) at the end of `fit`.

    Args:
        dirpath: output folder (replaced atomically); default `<trainer.default_root_dir>/model`.
        from_best: export the best checkpoint of the trainer's ModelCheckpoint when one exists.
        adapter_dirpath: under LoRA (`model.lora`), also write the adapters alone there as a peft folder
            (the main export always merges them into the base weights).
        specialists_dirpath: under task-routed LoRA (`model.lora.task_adapters`), also write each task's
            specialist (base + shared + that task's adapters, merged) as a plain folder `<specialists_dirpath>/<task>`
            (the main export is the shared adapters plus the fused task adapters).
    """

    def __init__(self, dirpath: Optional[str] = None, from_best: bool = True, adapter_dirpath: Optional[str] = None,
                 specialists_dirpath: Optional[str] = None):
        self.dirpath = dirpath
        self.from_best = from_best
        self.adapter_dirpath = adapter_dirpath
        self.specialists_dirpath = specialists_dirpath
        self.exported_from: Optional[str] = None
        self.exported_step: Optional[int] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the encoder the training instructions as named prompts, so every folder written from it
        (this export, the fusion winner) encodes `encode(q, prompt_name=NAME)` as training embedded q. A
        `specialists_dirpath` without task adapters is refused before anything trains."""
        if self.specialists_dirpath and not has_task_adapters(pl_module.encoder.model):
            raise InputError("ExportEncoder.specialists_dirpath", "is set but the model has no task adapters",
                             "set model.lora.task_adapters: true, or leave specialists_dirpath out")
        add_training_prompts(pl_module.encoder, getattr(trainer, "datamodule", None))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if self.from_best and best and os.path.exists(best):
            checkpoint = load_lightning_checkpoint(best)   # the rule of every checkpoint load (checkpoint_loading)
            pl_module.load_state_dict(checkpoint["state_dict"], strict=pl_module.strict_loading)  # LoRA: adapters only
            self.exported_from = best
            self.exported_step = checkpoint.get("global_step")
        else:
            self.exported_from = "final weights"
            self.exported_step = trainer.global_step
        with consolidated_weights(pl_module.encoder.model):  # FSDP2: every rank gathers the full weights to rank 0
            if trainer.is_global_zero:
                output = self.output_dir(trainer)
                pl_module.encoder.save(str(output), model_card=self.model_card(pl_module))
                if self.adapter_dirpath:
                    from codiemb_pl.model.lora import save_adapter

                    save_adapter(pl_module.encoder.model, self.adapter_dirpath)
                if self.specialists_dirpath:
                    for task, weights in task_specialist_weights(pl_module.encoder.model).items():
                        pl_module.encoder.save(str(Path(self.specialists_dirpath) / task), weights=weights)
                rank_zero_info(f"\n[codiemb] exported {self.exported_from} to {output.resolve()}")
        trainer.strategy.barrier("codiemb-export")

    def output_dir(self, trainer: Optional[pl.Trainer]) -> Path:
        """`dirpath`, or `<trainer.default_root_dir>/model` when it is unset."""
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.default_root_dir if trainer is not None else os.getcwd()) / "model"

    def model_card(self, pl_module: pl.LightningModule) -> str:
        """The README of the exported folder, from the module, its data module and validation history."""
        hp = dict(pl_module.hparams)
        trainer = pl_module._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        metrics, source = self.exported_metrics(pl_module)
        return build_model_card(
            base_model=str(hp.get("model_name_or_path")), training_data=training_data_rows(datamodule),
            sampler_policy=getattr(getattr(datamodule, "hparams", None), "policy", None),
            losses=losses_summary(pl_module), validation_metrics=metrics, metrics_source=source,
            model_path=str(self.output_dir(trainer)), **encoder_card_fields(pl_module.encoder))

    def exported_metrics(self, pl_module: pl.LightningModule) -> tuple[dict[str, float], str]:
        """The validation metrics measured on the exported weights when known, else the latest ones."""
        history = list(getattr(pl_module, "validation_history", []))
        if not history:
            return {}, ""
        for label, metrics in reversed(history):
            if self.exported_step is not None and label == f"step {self.exported_step}":
                return dict(metrics), f"the validation sets at step {self.exported_step} (the exported weights)"
        label, metrics = history[-1]
        return dict(metrics), f"the validation sets, latest validation during training ({label})"


def training_prompts(datamodule: Any) -> dict[str, str]:
    """The named prompts of the training instructions (`prompts.instruction_prompts`): one per instruction, named
    after the first sub-dataset that uses it, plus `query` (the first IR sub-dataset's instruction, config
    order) and `document` (`data.passage_prefix`, when set)."""
    sources = getattr(datamodule, "train_sources", None) or []
    passage_prefix = getattr(getattr(datamodule, "hparams", None), "passage_prefix", "") or ""
    return instruction_prompts(sources, datamodule.prefix_for, passage_prefix) if sources else {}


def add_training_prompts(encoder: Any, datamodule: Any) -> None:
    """Add the training instructions to `encoder.prompts` (see `training_prompts`), with the Pooling switch that
    reproduces training (`prompts.include_prompt_for`: mean pooling leaves the prompt and [CLS] out)."""
    prompts = training_prompts(datamodule)
    if prompts:
        encoder.prompts = {**encoder.prompts, **prompts}
        encoder.include_prompt = include_prompt_for(encoder.pooling)


def training_data_rows(datamodule: Any) -> list[dict[str, Any]]:
    """One card row per training sub-dataset of a CoDiEmbDataModule (empty without one)."""
    sources = getattr(datamodule, "train_sources", None) or []
    return [{"name": s.name, "task": s.task, "path": s.path, "split": s.split, "instruction": s.instruction,
             "batch_size": datamodule.batch_size_of(s) if hasattr(datamodule, "batch_size_of") else s.batch_size,
             "max_samples": s.max_samples} for s in sources]


def losses_summary(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The IR and STS objectives with their settings, as the module's objectives describe themselves."""
    describe = getattr(pl_module, "objectives_for_card", None)
    return describe() if describe is not None else {}
