"""LightningCLI for `codiemb fit | validate | test | predict` (imported only when one of those runs).

`codiemb_pl.cli.main.main` (the console entry) dispatches here; project commands and `--help` never import Lightning.
`build_cli(args)` constructs (and so runs) the CLI as `codiemb` does; `build_fit_parser()` gives the `fit`
parser alone, built exactly as the CLI builds it, for `cli.fit` (resolve a fit config without running it).
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from codiemb_pl.callbacks.interruption import GracefulInterruption, TrainingInterrupted
from codiemb_pl.cli.config_errors import explain_config_error, parser_keys
from codiemb_pl.cli.held_logs import HeldLogs
from codiemb_pl.cli.moved_paths import check_no_moved_paths
from codiemb_pl.cli.predict_output import check_output_path, write_embeddings
from codiemb_pl.cli.run_folder import (check_fit_outputs, checkpoint_folders, last_checkpoint_paths,
                                      remove_stale_temporaries_of_run)
from codiemb_pl.cli.saved_config import DurableSaveConfigCallback
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sampler import POLICIES
from codiemb_pl.errors import InputError
from codiemb_pl.evaluation.tables import comparison_table
from codiemb_pl.fusion.sources import load_lightning_checkpoint
from codiemb_pl.model.widths import check_width, truncate
from codiemb_pl.model.pooling import check_pooling_mode
from codiemb_pl.storage.run_lock import RunLock, acquire_run_lock
from codiemb_pl.training.checkpoint_io import install_durable_checkpoint_io, install_safe_loading, trusted_by
from codiemb_pl.training.conflict_probe import check_conflict_settings
from codiemb_pl.training.joint_step import check_joint_settings
from codiemb_pl.training.module import CoDiEmbModule
from codiemb_pl.training.resume import bring_last_up_to_date, lasts_to_watch, resolve_last_checkpoint
from codiemb_pl.training.trainer import DurableTrainer


class CoDiEmbCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model and the sampler doing the sharding."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.held_logs = HeldLogs().hold()  # Lightning's banners wait until the input has been checked
        self.run_lock: Optional[RunLock] = None  # `fit`'s lock on trainer.default_root_dir (before_instantiate_classes)
        try:
            super().__init__(*args, **kwargs)
        finally:
            self.held_logs.discard()  # a run that failed before its checks passed shows only warnings
            if self.run_lock is not None:  # success, InputError, interruption, any exception
                self.run_lock.release()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.encoder", "data.length_cap", lambda encoder: encoder.max_seq_length,
                              apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        """LightningCLI's parser of `subcommand`, plus `--predict_output` and `--predict_truncate_dim` for `predict`."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("--predict_output", type=Optional[str], default=None,
                                help="where `predict` writes the embeddings of data.predict: FILE.npy (float32 "
                                     "matrix, row i = text i) or FILE.parquet (columns text, embedding)")
            parser.add_argument("--predict_truncate_dim", type=Optional[int], default=None,
                                help="write the first D dimensions of every embedding (a Matryoshka width), "
                                     "re-normalised when the model normalises; default: the full width")
        return parser

    def init_parser(self, **kwargs: Any):
        """The LightningCLI parser, raising on a bad option or value instead of printing usage and exiting."""
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def parse_arguments(self, parser, args) -> None:
        """Parse the command line and configs; a rejected key or value becomes a one-line `InputError` naming
        the config file (or the command line), the key and the nearest valid key. A config naming a class or
        module path that moved in the 0.2 re-layout gets one line naming the new path (`moved_paths`)."""
        check_no_moved_paths(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            argv = list(sys.argv[1:] if args is None else args)
            command = next((token for token in argv if token in self.subcommands()), None)
            subparsers = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {})
            keys = parser_keys(subparsers.get(command, parser))
            raise explain_config_error(str(error), argv, keys, command or "<command>") from error

    def _parse_ckpt_path(self) -> None:
        """Read `--ckpt_path`'s hyper-parameters into the model config, as LightningCLI does, but through
        `checkpoint_loading` (CRCs, weights-only with the allow-list, unless `--weights_only false`)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else {}
        path = config.get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        checkpoint = load_lightning_checkpoint(path, trust=trusted_by(config.get("weights_only")), mmap=True)
        hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs: Any):
        """LightningCLI's trainer, whose checkpoint loads follow `checkpoint_loading` (`install_safe_loading`)."""
        trainer = super().instantiate_trainer(**kwargs)
        install_safe_loading(trainer.strategy)
        return trainer

    def before_instantiate_classes(self) -> None:
        """Check the choice-valued settings before the model is loaded or anything is written."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        check_choices(config)
        if config.get("trainer") is not None:  # unset logger / checkpoint folders follow trainer.default_root_dir
            from codiemb_pl.cli.run_folder import fill_unset_folders

            fill_unset_folders(config["trainer"])
        if self.subcommand == "fit":  # one writer per run folder; validate / test / predict write no run outputs
            self.run_lock = acquire_run_lock(config["trainer"].get("default_root_dir") or os.getcwd(), "fit",
                                             folder_option="--trainer.default_root_dir")

    def before_fit(self) -> None:
        """Read and check all data and the sampler plan before any training or writing starts; from here on,
        SIGTERM / SIGINT save `last.ckpt` and stop (`GracefulInterruption`) unless a config already adds one."""
        trainer = self.trainer
        check_fit_outputs(trainer)  # an unwritable output folder stops the run now, not after training
        hp, data = self.model.hparams, self.datamodule
        check_joint_settings(hp.gradient_combination, data.hparams.policy, trainer)
        check_conflict_settings(hp.conflict_every, trainer, {source.task for source in data.val_sources})
        if not any(isinstance(callback, GracefulInterruption) for callback in trainer.callbacks):
            trainer.callbacks.append(GracefulInterruption())
        plan = self.datamodule.check_training_plan(trainer.world_size, trainer.accumulate_grad_batches)
        self.held_logs.release()
        if trainer.is_global_zero:
            print("[codiemb] training plan\n" + plan.describe(), flush=True)

    def fit(self, model: CoDiEmbModule, **kwargs: Any) -> None:
        """`trainer.fit`, with durable checkpoint files (`checkpoint_io.install_durable_checkpoint_io`), the
        temporaries a killed run left removed (`run_folder.remove_stale_temporaries_of_run`) and
        `--ckpt_path last` resolved to the newest complete checkpoint (`resume.resolve_last_checkpoint`)."""
        trainer = self.trainer
        watched: list = []   # `--ckpt_path last`: the last checkpoints to bring up to date if the fit saves none
        warning = install_durable_checkpoint_io(trainer.strategy)
        if trainer.is_global_zero:
            for line in (warning, remove_stale_temporaries_of_run(trainer)):
                if line:
                    print(line, flush=True)
        if kwargs.get("ckpt_path") == "last":
            path, line = resolve_last_checkpoint(checkpoint_folders(trainer))
            if line and trainer.is_global_zero:
                print(line, flush=True)
            kwargs["ckpt_path"] = None if path is None else str(path)
            if path is not None and trainer.is_global_zero:
                watched = lasts_to_watch(path, last_checkpoint_paths(trainer))
        trainer.fit(model, **kwargs)
        for last in bring_last_up_to_date(Path(kwargs["ckpt_path"]), watched) if watched else ():
            print(f"[codiemb] --ckpt_path last: nothing was left to train, so {last} now holds "
                  f"{Path(kwargs['ckpt_path']).name} (step {trainer.global_step})", flush=True)

    def before_validate(self) -> None:
        self.datamodule.setup("validate")  # read and check the sets before Lightning's banners
        self.held_logs.release()

    def before_test(self) -> None:
        self.datamodule.setup("test")
        self.held_logs.release()

    def before_predict(self) -> None:
        check_output_path(self.config[self.subcommand].get("predict_output"))
        check_width(self.config[self.subcommand].get("predict_truncate_dim"), self.model.encoder.embedding_dim,
                    "--predict_truncate_dim")
        self.datamodule.setup("predict")
        self.held_logs.release()

    def predict(self, model: CoDiEmbModule, datamodule: CoDiEmbDataModule, **kwargs: Any) -> None:
        """Embed the data.predict texts and write them to --predict_output (rank 0, atomically)."""
        kwargs["return_predictions"] = False
        self.trainer.predict(model, datamodule=datamodule, **kwargs)
        if self.trainer.is_global_zero:
            if getattr(model, "predictions", None) is None:  # e.g. ddp_spawn: the embeddings stayed in its workers
                raise InputError("trainer.strategy", "predict got no embeddings back in this process",
                                 "run predict on one device or with the default ddp strategy")
            output = self.config[self.subcommand].get("predict_output")
            texts = datamodule.predict_sets[0].texts["text"]
            embeddings = truncate(model.predictions, self.config[self.subcommand].get("predict_truncate_dim"),
                                  renormalize=model.encoder.normalize)
            path = write_embeddings(output, embeddings.numpy(), texts)
            print(f"[codiemb] wrote {len(texts)} embeddings of dimension {embeddings.shape[1]} to {path}",
                  flush=True)

    def after_fit(self) -> None:
        """Validate the final weights if the last validation is stale, then print start-vs-end metrics."""
        module, trainer = self.model, self.trainer
        has_val = bool(getattr(self.datamodule, "val_sources", None))
        history = getattr(module, "validation_history", [])
        if has_val and trainer.global_step > 0 and (not history or history[-1][0] != f"step {trainer.global_step}"):
            module.validation_label = "exported"
            trainer.validate(module, datamodule=self.datamodule, verbose=False)
            module.validation_label = None
        table = comparison_table(getattr(module, "validation_history", []))
        if table and trainer.is_global_zero:
            print("\nvalidation metrics (start = before training)\n" + table, flush=True)


def check_choices(config: Any) -> None:
    """The choice-valued settings of a parsed config (`model.pooling`, `data.policy`): one `InputError` for an
    unknown choice. (jsonargparse types them as strings, so the parse itself lets any name through.)"""
    pooling = config.get("model.pooling")
    if pooling is not None:
        check_pooling_mode(pooling, where="model.pooling")
    policy = config.get("data.policy")
    if policy is not None and policy not in POLICIES:
        raise InputError("data.policy", f"unknown sampler policy {policy!r}", f"use one of: {', '.join(POLICIES)}")


def cli_settings() -> dict[str, Any]:
    """How `codiemb` constructs its LightningCLI (`build_cli` and `build_fit_parser` alike), as fresh objects."""
    return {"model_class": CoDiEmbModule, "datamodule_class": CoDiEmbDataModule, "trainer_class": DurableTrainer,
            "save_config_callback": DurableSaveConfigCallback, "save_config_kwargs": {"overwrite": True},
            "trainer_defaults": {"use_distributed_sampler": False}}


def build_cli(args: Any) -> CoDiEmbCLI:
    """Construct, and so run, the CLI on `args` (a command line after `codiemb`, or `{"subcommand": ..., NAME:
    config}`); exceptions (`InputError`, `TrainingInterrupted`, crashes) propagate."""
    with warnings.catch_warnings():  # `main(args)` in-process is this CLI's design, not a mistake to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return CoDiEmbCLI(args=args, **cli_settings())


class _ParserReady(Exception):
    """Stops `_FitParserOnly` once its parser is built (LightningCLI's constructor would go on to parse and run)."""

    def __init__(self, parser):
        super().__init__("parser built")
        self.parser = parser


class _FitParserOnly(CoDiEmbCLI):
    """CoDiEmbCLI that builds the `fit` subcommand parser (as `LightningCLI._add_subcommands` does for each
    subcommand: core arguments, CoDiEmbCLI's links, `fit`'s own arguments such as `ckpt_path`) and stops."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]):
        self._subcommand_method_arguments = {}
        raise _ParserReady(self._prepare_subcommand_parser(self.trainer_class, "fit", **subparser_kwargs.get("fit", {})))


def build_fit_parser():
    """`codiemb fit`'s parser (jsonargparse, LightningCLI's `fit` subcommand parser of this CLI), without parsing
    or running anything: what `--print_config` dumps, parsed by the object itself (`cli.fit.FitConfigParser`)."""
    try:
        _FitParserOnly(args=[], **cli_settings())
    except _ParserReady as ready:
        return ready.parser
    raise RuntimeError("LightningCLI did not build its parser through setup_parser")  # pragma: no cover


def run_lightning_cli(args: Optional[list[str]]) -> int:
    """Run a LightningCLI subcommand (fit / validate / test / predict); returns the exit code."""
    try:
        build_cli(args)
    except TrainingInterrupted as interruption:
        print(f"codiemb: interrupted: {interruption}", file=sys.stderr)
    return 0
