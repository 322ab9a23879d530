"""`codiemb export-onnx`: convert an exported model folder to ONNX (float32 and int8-quantised).

    codiemb export-onnx runs/x/model [--no-quantize] [--opset 18]

Writes FOLDER/onnx/model.onnx (the transformer; sentence-transformers' `backend="onnx"` layout) and, unless
`--no-quantize`, FOLDER/onnx/model_qint8.onnx (dynamically quantised int8 weights), each atomically, then
checks the float32 graph against the PyTorch encoder on a few texts and prints the largest difference.
Needs the `onnx` extra (`pip install 'codiemb_pl[onnx]'`). A thin parser over `model.onnx.export_onnx`.
"""

from __future__ import annotations

import argparse

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser

CHECK_TEXTS = ["A man is playing a guitar.", "The stock market fell sharply on Monday after the announcement.",
               "how do I blanch vegetables?"]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="codiemb export-onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a sentence-transformers folder (codiemb fit's export, codiemb fuse's output)")
    parser.add_argument("--no-quantize", action="store_true", help="write the float32 graph only")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    return parser


@register_command("export-onnx")
def export_onnx_command(argv: list[str]) -> int:
    """Run `codiemb export-onnx` with `argv`; returns the exit code."""
    args = build_parser().parse_args(argv)
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.model.onnx import ONNX_FILE, OnnxEncoder, export_onnx

    written = export_onnx(args.folder, quantize=not args.no_quantize, opset=args.opset)
    reference = TextEncoder(args.folder).encode(CHECK_TEXTS).numpy()
    difference = float(abs(OnnxEncoder(args.folder, ONNX_FILE).encode(CHECK_TEXTS) - reference).max())
    for path in written:
        print(f"[codiemb] wrote {path}", flush=True)
    print(f"[codiemb] float32 ONNX vs PyTorch on {len(CHECK_TEXTS)} texts: largest embedding difference "
          f"{difference:.2e}", flush=True)
    return 0
