"""The library API beneath `codiemb fit`: resolve a fit config and run a fit in this process, raising
`InputError` for bad input (never an exit code, never printed text to read back).

    from codiemb_pl.cli.fit import FitConfigParser, resolve_fit_config, run_fit

    parser = FitConfigParser()                    # `codiemb fit`'s own parser, built once, reused by every resolve
    config = resolve_fit_config(["--config", "configs/quickstart.yaml", "--trainer.max_steps", "2"], parser)
    result = run_fit(config)                      # FitResult: status, export folder, checkpoints, fusion, metrics

`resolve_fit_config(args | mapping)` is what `codiemb fit ARGS --print_config` prints, as a dict: the command
line (or a config mapping) parsed by LightningCLI's `fit` parser object (`cli.lightning.build_fit_parser`),
with the CLI's one-line errors (`config_errors`), its moved-class-path line (`moved_paths`) and its checks of
choice-valued settings. `run_fit(config | args, ckpt_path=None)` runs `codiemb fit` on it, in this process and
through the same CLI (run lock, checks, durable checkpoints, export, CheckpointFusion, validation table):
`codiemb fit` itself is `main(["fit", ...])`, unchanged. A deliberate stop (SIGTERM / SIGINT, `last.ckpt`
saved) is `FitResult.status == "interrupted"`; bad input raises `InputError`; a crash raises as it is.
"""

from __future__ import annotations

import copy
import os
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from codiemb_pl.callbacks.export import ExportEncoder
from codiemb_pl.callbacks.fusion import CheckpointFusion
from codiemb_pl.callbacks.interruption import TrainingInterrupted
from codiemb_pl.cli.config_errors import explain_config_error, parser_keys
from codiemb_pl.cli.lightning import build_cli, build_fit_parser, check_choices
from codiemb_pl.cli.moved_paths import check_no_moved_paths, check_no_moved_values
from codiemb_pl.errors import InputError

FINISHED, INTERRUPTED = "finished", "interrupted"


class FitConfigParser:
    """`codiemb fit`'s parser (LightningCLI's `fit` subcommand parser of `CoDiEmbCLI`), built once when first
    used and reused by every `resolve`: a sweep of N runs builds one parser, not one CLI per run."""

    def __init__(self):
        self._parser = None

    @property
    def parser(self):
        if self._parser is None:
            self._parser = build_fit_parser()
        return self._parser

    def __deepcopy__(self, memo: dict) -> "FitConfigParser":
        return self   # holds no state a resolve changes: a copied plan shares its parser

    def resolve(self, args: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
        """The resolved fit config (see `resolve_fit_config`)."""
        parser = self.parser
        if isinstance(args, Mapping):
            check_no_moved_values(args, "fit config")
            mapping = copy.deepcopy(dict(args))   # jsonargparse turns nested mappings into namespaces in place
            namespace = self._parse(lambda: parser.parse_object(mapping), [], "fit config")
        else:
            argv = [str(arg) for arg in args]
            if argv[:1] == ["fit"]:
                argv = argv[1:]
            check_no_moved_paths(argv)
            namespace = self._parse(lambda: parser.parse_args(argv), argv, "command line")
        check_choices(namespace)
        return yaml.safe_load(parser.dump(namespace, skip_unset=False))   # as --print_config dumps it

    def _parse(self, parse, argv: list[str], where: str):
        try:
            return parse()
        except ArgumentError as error:
            explained = explain_config_error(str(error), argv, parser_keys(self.parser), "fit")
            if explained.where == "command line" and where != "command line":   # a mapping has no command line
                explained = InputError(where, explained.problem, explained.fix)
            raise explained from error


def resolve_fit_config(args: Sequence[str] | Mapping[str, Any],
                       parser: Optional[FitConfigParser] = None) -> dict[str, Any]:
    """The fully resolved fit config of `codiemb fit ARGS` (`args`: what follows `codiemb fit`, e.g.
    `["--config", "run.yaml", "--trainer.max_steps", "2"]`) or of a config mapping (what a `--config` file holds,
    or a config this function returned), as `--print_config` prints it; `InputError` (one line) for bad input.
    Pass one `parser` to resolve many configs with one parser build."""
    return (parser or FitConfigParser()).resolve(args)


@dataclass
class FitResult:
    """What one `run_fit` did.

    status: `finished`, or `interrupted` (SIGTERM / SIGINT: `last.ckpt` saved, nothing exported; run again with
        `ckpt_path=<checkpoint_folder>/last.ckpt` to resume).
    config: the resolved config that ran. root: its `trainer.default_root_dir`.
    export_folder: the ExportEncoder's sentence-transformers folder (None: no ExportEncoder, or interrupted).
    checkpoint_folder: where the run's checkpoints (`last.ckpt`) are.
    fusion: the CheckpointFusion leaderboard (None: no CheckpointFusion, fusion skipped, or interrupted);
        fusion_export: the folder it exported its winner to.
    metrics: the final validation metrics (the last column of the start-vs-end table; {} without `data.val`).
    global_step: optimizer steps done. message: the interruption line `codiemb fit` prints.
    """

    status: str
    config: dict[str, Any]
    root: Path
    export_folder: Optional[Path] = None
    checkpoint_folder: Optional[Path] = None
    fusion: Any = None
    fusion_export: Optional[Path] = None
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


def run_fit(config: Sequence[str] | Mapping[str, Any], *, ckpt_path: str | os.PathLike | None = None,
            parser: Optional[FitConfigParser] = None) -> FitResult:
    """Run `codiemb fit` in this process on a resolved config (or on `codiemb fit`'s arguments, resolved first),
    resuming from `ckpt_path` when given (a file, or `last`). Returns a `FitResult`; `InputError` for bad input
    (before or during the fit), any other exception as it is."""
    resolved = resolve_fit_config(config, parser) if not isinstance(config, Mapping) else dict(config)
    fit = copy.deepcopy(resolved)   # the CLI's parse turns nested mappings into namespaces in place
    if ckpt_path is not None:
        fit["ckpt_path"] = str(ckpt_path)
    root = Path((resolved.get("trainer") or {}).get("default_root_dir") or os.getcwd())
    try:
        cli = build_cli({"subcommand": "fit", "fit": fit})
    except TrainingInterrupted as stop:
        return FitResult(INTERRUPTED, resolved, root, checkpoint_folder=Path(stop.checkpoint).parent,
                         global_step=stop.step, message=str(stop))
    return finished_result(cli, resolved, root)


def finished_result(cli: Any, resolved: dict[str, Any], root: Path) -> FitResult:
    """The `FitResult` of a CLI whose `fit` ended normally: its callbacks' folders and results, its metrics."""
    trainer, module = cli.trainer, cli.model
    result = FitResult(FINISHED, resolved, Path(trainer.default_root_dir or root), global_step=trainer.global_step)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        result.checkpoint_folder = Path(checkpoint.dirpath)
    for callback in trainer.callbacks:
        if isinstance(callback, ExportEncoder) and result.export_folder is None:
            result.export_folder = callback.output_dir(trainer)
        elif isinstance(callback, CheckpointFusion) and result.fusion is None and callback.leaderboard is not None:
            result.fusion = callback.leaderboard
            exported = callback.root(trainer) / "model"
            result.fusion_export = exported if callback.export and exported.is_dir() else None
    history = list(getattr(module, "validation_history", []) or [])
    result.metrics = dict(history[-1][1]) if history else {}
    return result
