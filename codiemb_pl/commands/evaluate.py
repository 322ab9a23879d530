"""`codiemb evaluate`: score any model on STS pair files and BEIR folders, MTEB's metric names.

    codiemb evaluate --model runs/x/model --sts stsb=data/stsb_test.jsonl --ir scifact=data/scifact \
        --output results.json [--geometry] [--split test] [--sts-range 0 5] [--batch-size 64] [--max-length 256]
        [--instruction scifact='Given a claim, find evidence'] [--instruction-template T] [--passage-prefix P]
        [--truncate-dim 256 128 64] [--precision float32 int8 binary --calibration train_texts.txt]
    codiemb evaluate --config evaluate.yaml      # the same options as YAML keys (model, sts, batch_size, ...)

`--model` is a sentence-transformers folder, a Hugging Face folder, a hub id, `pkg://...`, or a Lightning
checkpoint (`.ckpt`; its `encoder.model.*` weights go into the encoder named by the checkpoint's
`model_name_or_path`, or by `--base`). The metrics are those of `evaluation.suite.score_set` (the
validation code of training); `--output` gets `{set: {metric: value}}` written atomically (NaN/inf
as null), and only after every set has been scored. `--truncate-dim` and `--precision` add the scores at those
widths and precisions from the same encoding pass (`metric@128`, `metric@128:int8`) and a table of the
headline metric by width and precision with the bytes per vector. A thin parser over
`workflows.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE
from codiemb_pl.errors import InputError
from codiemb_pl.evaluation.tables import format_metrics_table
from codiemb_pl.model.device import add_device_argument, resolve_device
from codiemb_pl.storage.atomic import atomic_write_text
from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
from codiemb_pl.storage.output_paths import check_writable_file

COMMAND = "codiemb evaluate"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=COMMAND, description="Score a model on STS pair files and BEIR retrieval folders.",
                           config_files=True)
    parser.add_argument("--model", required=True,
                        help="sentence-transformers / Hugging Face folder, hub id, pkg://..., or a Lightning .ckpt")
    parser.add_argument("--base", help="model folder whose architecture a .ckpt's weights are loaded into "
                                       "(default: the checkpoint's model_name_or_path)")
    parser.add_argument("--sts", action="append", default=[], metavar="NAME=FILE",
                        help="STS pairs (sentence1, sentence2, score); repeatable")
    parser.add_argument("--sts-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="score scale of every --sts file (default per file: [0, 1] if all scores lie in it, "
                             "else [0, 5])")
    parser.add_argument("--ir", action="append", default=[], metavar="NAME=DIR",
                        help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); repeatable")
    parser.add_argument("--split", default="test", help="qrels split of the --ir folders (default: test)")
    parser.add_argument("--output", help="write {set: {metric: value}} to this JSON file")
    parser.add_argument("--geometry", action="store_true",
                        help="add token similarity, numerical rank, SVD entropy, condition number, anisotropy, "
                             "alignment and uniformity to every set")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch (default: 64)")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    parser.add_argument("--instruction", action="append", default=[], metavar="NAME=TEXT",
                        help="instruction of set NAME: prefixes its queries (IR) or both sentences (STS) and is "
                             "left out of pooling, as `instruction` of a data.val source; repeatable")
    parser.add_argument("--instruction-template", default=INSTRUCTION_TEMPLATE,
                        help=f"how an instruction becomes a prefix (default: {INSTRUCTION_TEMPLATE!r})")
    parser.add_argument("--passage-prefix", default="", help="prefix of every IR document (default: none)")
    parser.add_argument("--truncate-dim", nargs="+", type=int, default=[], metavar="D",
                        help="also score the first D dimensions of every embedding (re-normalised), e.g. the "
                             "Matryoshka widths 256 128 64; all from one encoding pass")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=("float32", "int8", "binary"),
                        help="also score int8 (ranges calibrated on --calibration) and binary embeddings (Hamming "
                             "ranking rescored with the float query); default: float32 only")
    parser.add_argument("--calibration", metavar="FILE",
                        help="training texts the int8 ranges are calibrated on (.txt, one per line, or a "
                             "jsonl/csv/tsv/parquet column), never the test corpus")
    parser.add_argument("--calibration-column", default="text", help="the text column of --calibration")
    add_device_argument(parser)
    add_trust_checkpoint_argument(parser)
    return parser


def geometry_table(per_set: dict[str, dict[str, float]]) -> str:
    """Geometry metrics, one row per set, in 4 significant digits (condition numbers span many decades)."""
    from codiemb_pl.evaluation.geometry import GEOMETRY_METRIC_NAMES  # here, not at the top: `--help` stays torch-free

    rows = {name: {m: v for m, v in values.items() if m in GEOMETRY_METRIC_NAMES} for name, values in per_set.items()}
    rows = {name: values for name, values in rows.items() if values}
    if not rows:
        return ""
    width = max(len(name) for name in rows)
    lines = ["geometry", f"{'set':<{width}}  " + "  ".join(f"{m:>16}" for m in GEOMETRY_METRIC_NAMES)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values.get(m, math.nan):>16.4g}" for m in GEOMETRY_METRIC_NAMES))
    return "\n".join(lines)


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def results_json(per_set: dict[str, dict[str, float]]) -> str:
    """`{set: {metric: value}}` as strict JSON (NaN and inf become null)."""
    data: dict[str, Any] = {name: {metric: _json_value(float(v)) for metric, v in values.items()}
                            for name, values in per_set.items()}
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


@register_command("evaluate")
def evaluate_command(argv: list[str]) -> int:
    """Run `codiemb evaluate` with `argv` (everything after the command name); returns the exit code."""
    args = build_parser().parse_args(argv)  # before the heavy imports: `--help` and bad arguments stay fast
    from codiemb_pl.evaluation.geometry import GEOMETRY_METRIC_NAMES
    from codiemb_pl.data.texts import read_texts
    from codiemb_pl.workflows.evaluation import evaluate, load_sets

    if args.output is not None:
        check_writable_file(args.output, "--output")
    if "int8" in args.precision and not args.calibration:   # before any model is loaded
        raise InputError("--precision int8", "int8 needs its ranges calibrated on training texts",
                         "pass --calibration FILE (texts from the training data, at least 2; never the test corpus)")
    device = resolve_device(args.device)
    sets = load_sets(args.sts, args.ir, args.sts_range, args.split, args.instruction, args.instruction_template,
                     args.passage_prefix)
    calibration = read_texts(args.calibration, args.calibration_column) if args.calibration else []
    with trusted_checkpoints(bool(args.trust_checkpoint)):
        per_set, summary = evaluate(args.model, sets, base=args.base, device=device, batch_size=args.batch_size,
                                    max_seq_length=args.max_length, geometry=args.geometry,
                                    show_progress=sys.stderr.isatty(), dims=args.truncate_dim,
                                    precisions=args.precision, calibration_texts=calibration)
    task_metrics = {name: {m: v for m, v in values.items() if m not in GEOMETRY_METRIC_NAMES}
                    for name, values in per_set.items()}
    print(format_metrics_table(task_metrics, summary, title=f"evaluation of {args.model}"), flush=True)
    if args.geometry:
        print(geometry_table(per_set), flush=True)
    if args.output is not None:
        atomic_write_text(args.output, results_json(per_set))
        print(f"wrote {args.output}", flush=True)
    return 0
