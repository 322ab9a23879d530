"""`codiemb mine-negatives`: mine hard negatives for IR training data with a given model.

    codiemb mine-negatives DATA [--split train] [--corpus FILE] --model MODEL --output FILE.jsonl
                           [--range 10 50] [--margin 0.95 | --no-margin] [--num-negatives 4]
    codiemb mine-negatives --config mine.yaml    # the same options as YAML keys (data, model, output, ...)

DATA is a BEIR folder (with --split) or an IR file with query + positives. The corpus is the BEIR
folder's, or --corpus (a BEIR folder, a corpus .jsonl with `text`, or a .txt file with one document per
line); for an IR file without --corpus, the file's own positives and negatives. Writes IR JSON lines
`{"query", "positives", "negatives"}` atomically and prints how many queries got how many negatives.
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
    return parser


@register_command("mine-negatives")
def mine_negatives_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: `--help` and bad arguments stay fast
    check_writable_file(args.output, "--output")
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
    print(f"[codiemb] mining {len(queries)} queries against {len(corpus)} documents with {args.model}",
          file=sys.stderr, flush=True)
    result = mine_hard_negatives(encoder, queries, corpus, settings, batch_size=args.batch_size,
                                 query_prompt=args.query_prompt, show_progress=not args.no_progress)
    write_ir_jsonl(args.output, result.records)
    print(format_histogram(result.histogram))
    print(f"wrote {len(result.records)} queries to {args.output}")
    return 0
