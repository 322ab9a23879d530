"""`codiemb mine-negatives`: mine hard negatives for IR training data with a given model.

    codiemb mine-negatives DATA [--split train] [--corpus FILE] --model MODEL --output FILE.jsonl
                           [--range 10 50] [--margin 0.95 | --no-margin] [--num-negatives 4]
                           [--teacher MODEL [--teacher-margin M] [--teacher-top-k K] [--teacher-batch-size 64]]
    codiemb mine-negatives --config mine.yaml    # the same options as YAML keys (data, model, output, ...)

DATA is a BEIR folder (with --split) or an IR file with query + positives. The corpus is the BEIR
folder's, or --corpus (a BEIR folder, a corpus .jsonl with `text`, or a .txt file with one document per
line); for an IR file without --corpus, the file's own positives and negatives. Writes IR JSON lines
`{"query", "positives", "negatives"}` atomically and prints how many queries got how many negatives.

With --teacher (a bi-encoder, or a cross-encoder: a ...ForSequenceClassification folder with one output) every
candidate in the range is rescored by the teacher; candidates it scores at or above MARGIN x the lowest positive's
score (on [0, 1]: clipped cosines, sigmoid of logits) are dropped, and with --teacher-top-k K queries whose best
positive is not in the teacher's top K among the rescored candidates are dropped; the records get `teacher_scores`
(the positives' raw teacher scores, then the negatives'), and the command prints what each filter removed.
"""

from __future__ import annotations

import argparse
import sys

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument
from codiemb_pl.model.device import add_device_argument, resolve_device
from codiemb_pl.storage.output_paths import check_writable_file


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="codiemb mine-negatives", description=__doc__.split("\n\n")[0], config_files=True)
    parser.add_argument("data", help="BEIR folder (with --split) or an IR file (query + positives)")
    parser.add_argument("--split", default="train", help="BEIR qrels split (default: train)")
    parser.add_argument("--corpus", default=None, help="documents to mine from (default: the data's own)")
    parser.add_argument("--model", required=True, help="model folder, hub id, pkg:// model or a Lightning .ckpt")
    parser.add_argument("--output", required=True, help="IR JSON-lines file to write")
    parser.add_argument("--range", nargs=2, type=int, default=(10, 50), metavar=("LO", "HI"),
                        help="1-based ranks (inclusive) a negative may come from (default: 10 50)")
    margin = parser.add_mutually_exclusive_group()
    margin.add_argument("--margin", type=float, default=0.95,
                        help="keep candidates scoring below MARGIN x the lowest positive score (default: 0.95)")
    margin.add_argument("--no-margin", action="store_true", help="no score filter")
    parser.add_argument("--num-negatives", type=int, default=4, help="negatives per query (default: 4)")
    parser.add_argument("--query-prompt", default=None, help="text prepended to every query (e.g. an instruction)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoding batch")
    parser.add_argument("--max-seq-length", type=int, default=None, help="truncate texts to this many tokens")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_trust_checkpoint_argument(parser)
    parser.add_argument("--teacher", default=None, metavar="MODEL",
                        help="rescore the candidates with this bi-encoder or cross-encoder and write teacher_scores")
    parser.add_argument("--teacher-kind", default="auto", choices=("auto", "bi_encoder", "cross_encoder"),
                        help="the teacher's kind (default: auto, read from its folder)")
    parser.add_argument("--teacher-margin", type=float, default=None,
                        help="drop candidates the teacher scores at or above TEACHER_MARGIN x the lowest positive's, "
                             "on [0, 1] (default: --margin's value; none with --no-margin)")
    parser.add_argument("--teacher-top-k", type=int, default=None, metavar="K",
                        help="drop queries whose best positive is not in the teacher's top K among the candidates")
    parser.add_argument("--teacher-batch-size", type=int, default=64, help="texts (or pairs) per teacher batch")
    parser.add_argument("--teacher-max-seq-length", type=int, default=None,
                        help="truncate the teacher's texts (pairs) to this many tokens")
    return parser


TEACHER_ONLY_OPTIONS = ("teacher_margin", "teacher_top_k", "teacher_max_seq_length")


def teacher_filter_settings(args: argparse.Namespace):
    """The teacher's filters from the arguments; options that need --teacher refused without it."""
    from codiemb_pl.errors import InputError
    from codiemb_pl.workflows.teacher_mining import TeacherFilterSettings

    if args.teacher is None:
        for name in TEACHER_ONLY_OPTIONS:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise InputError(flag, "is given without --teacher", f"add --teacher MODEL, or drop {flag}")
        return None
    if args.teacher_batch_size < 1:
        raise InputError("--teacher-batch-size", f"must be at least 1, got {args.teacher_batch_size}", "e.g. 64")
    margin = args.teacher_margin if args.teacher_margin is not None else None if args.no_margin else args.margin
    return TeacherFilterSettings(margin=margin, top_k=args.teacher_top_k)


@register_command("mine-negatives")
def mine_negatives_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: `--help` and bad arguments stay fast
    check_writable_file(args.output, "--output")
    teacher_filter = teacher_filter_settings(args)
    from codiemb_pl.workflows.mine import (
        MiningSettings,
        format_histogram,
        load_mining_inputs,
        mine_hard_negatives,
        write_ir_jsonl,
    )

    settings = MiningSettings(rank_range=tuple(args.range), margin=None if args.no_margin else args.margin,
                              num_negatives=args.num_negatives)
    device = resolve_device(args.device)
    queries, corpus = load_mining_inputs(args.data, args.split, args.corpus)
    from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
    from codiemb_pl.workflows.encoders import load_encoder

    with trusted_checkpoints(bool(args.trust_checkpoint)):
        encoder = load_encoder(args.model, device=device, max_seq_length=args.max_seq_length)
    teacher = None
    if teacher_filter is not None:
        from codiemb_pl.model.teacher import TeacherSettings, load_teacher

        teacher = load_teacher(TeacherSettings(args.teacher, kind=args.teacher_kind, batch_size=args.teacher_batch_size,
                                               max_seq_length=args.teacher_max_seq_length), device=device)
    print(f"[codiemb] mining {len(queries)} queries against {len(corpus)} documents with {args.model}",
          file=sys.stderr, flush=True)
    result = mine_hard_negatives(encoder, queries, corpus, settings, batch_size=args.batch_size,
                                 query_prompt=args.query_prompt, show_progress=not args.no_progress,
                                 **({} if teacher is None else {"teacher": teacher, "teacher_filter": teacher_filter}))
    write_ir_jsonl(args.output, result.records)
    if result.teacher_report is not None:
        print(result.teacher_report.summary(f"{args.teacher} ({teacher.kind})", teacher_filter))
    print(format_histogram(result.histogram))
    print(f"wrote {len(result.records)} queries to {args.output}")
    return 0
