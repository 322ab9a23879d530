"""`codiemb` command line: LightningCLI for fit / validate / test / predict, plus project commands.

`main(args=None)` is the single entry point (console script `codiemb`, `python -m codiemb_pl`, and tests
calling `main([...])` in-process). Bad input (`InputError`) ends with one clear line and exit code 2;
set `CODIEMB_DEBUG=1` or pass `--debug` for the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from typing import Any, Callable, Optional

from lightning.pytorch.cli import LightningCLI

from .callbacks.interruption import GracefulInterruption, TrainingInterrupted
from .reporting import comparison_table
from .data.datamodule import CoDiEmbDataModule
from .data.sampler import POLICIES
from .errors import InputError
from .module import CoDiEmbModule
from .pooling import check_pooling_mode

EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {}


def register_command(name: str):
    """Register a project command (`codiemb NAME ...`) handled outside LightningCLI."""
    def decorate(fn: Callable[[list[str]], int]):
        EXTRA_COMMANDS[name] = fn
        return fn
    return decorate


class CoDiEmbCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model and the sampler doing the sharding."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.encoder", "data.length_cap", lambda encoder: encoder.max_seq_length,
                              apply_on="instantiate")

    def init_parser(self, **kwargs: Any):
        """The LightningCLI parser, raising on a bad option or value instead of printing usage and exiting."""
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def parse_arguments(self, parser, args) -> None:
        """Parse the command line and configs; a rejected option or value becomes a one-line `InputError`."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise config_error(str(error)) from error

    def before_instantiate_classes(self) -> None:
        """Check the choice-valued settings before the model is loaded or anything is written."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        pooling = config.get("model.pooling")
        if pooling is not None:
            check_pooling_mode(pooling, where="model.pooling")
        policy = config.get("data.policy")
        if policy is not None and policy not in POLICIES:
            raise InputError("data.policy", f"unknown sampler policy {policy!r}", f"use one of: {', '.join(POLICIES)}")
        if config.get("trainer") is not None:  # unset logger / checkpoint folders follow trainer.default_root_dir
            from .run_folder import fill_unset_folders

            fill_unset_folders(config["trainer"])

    def before_fit(self) -> None:
        """Read and check all data and the sampler plan before any training or writing starts; from here on,
        SIGTERM / SIGINT save `last.ckpt` and stop (`GracefulInterruption`) unless a config already adds one."""
        trainer = self.trainer
        if not any(isinstance(callback, GracefulInterruption) for callback in trainer.callbacks):
            trainer.callbacks.append(GracefulInterruption())
        plan = self.datamodule.check_training_plan(trainer.world_size, trainer.accumulate_grad_batches)
        if trainer.is_global_zero:
            print("[codiemb] training plan\n" + plan.describe(), flush=True)

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


def config_error(message: str) -> InputError:
    """jsonargparse's (multi-line) parse error as one `InputError` naming the offending key when it can."""
    key = re.search(r'(?:Parser key|key) "([^"]+)"', message)
    problem = " ".join(line.strip() for line in message.splitlines() if line.strip())
    problem = re.sub(r'^Parser key "[^"]+":\s*', "", problem)
    return InputError(key.group(1) if key else "command line", problem,
                      "see `codiemb <command> --help` for the accepted options and values")


def run_lightning_cli(args: Optional[list[str]]) -> None:
    CoDiEmbCLI(CoDiEmbModule, CoDiEmbDataModule, args=args, save_config_kwargs={"overwrite": True},
               trainer_defaults={"use_distributed_sampler": False})


def main(args: Optional[list[str]] = None) -> int:
    """Run one `codiemb` command; returns the process exit code (0 on success)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("CODIEMB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _load_extra_commands()
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return int(EXTRA_COMMANDS[argv[0]](argv[1:]) or 0)
        run_lightning_cli(None if args is None and argv == sys.argv[1:] else argv)
        return 0
    except InputError as error:
        if debug:
            raise
        print(f"codiemb: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interruption:
        print(f"codiemb: interrupted: {interruption}", file=sys.stderr)
        return 0


def _load_extra_commands() -> None:
    """Import the modules that register project commands (each registers itself on import)."""
    from .commands import import_all

    import_all()


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
