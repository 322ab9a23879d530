"""`codiemb` command line: LightningCLI for fit / validate / test / predict, plus project commands.

`main(args=None)` is the single entry point (console script `codiemb`, `python -m codiemb_pl`, and tests
calling `main([...])` in-process). Bad input (`InputError`) ends with one clear line and exit code 2;
set `CODIEMB_DEBUG=1` or pass `--debug` for the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from lightning.pytorch.cli import LightningCLI

from .reporting import comparison_table
from .data.datamodule import CoDiEmbDataModule
from .errors import InputError
from .module import CoDiEmbModule

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

    def before_fit(self) -> None:
        """Read and check all data and the sampler plan before any training or writing starts."""
        trainer = self.trainer
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


def _load_extra_commands() -> None:
    """Import the modules that register project commands (each registers itself on import)."""
    from .commands import import_all

    import_all()


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
