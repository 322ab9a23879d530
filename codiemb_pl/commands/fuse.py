"""`codiemb fuse`: merge checkpoints fine-tuned from one base into a sentence-transformers folder.

    codiemb fuse --base BASE --model A --model B [--weights 1 1] --method ties --param density=0.2 \
        --output runs/fused [--template FOLDER] [--seed 0]
    codiemb fuse --recipe fuse.yaml        # flags given beside it override the recipe

Recipe (mergekit-like):

    base: runs/x/fusion/snapshots/base.safetensors   # or a model folder / .ckpt
    models: [{path: runs/x/checkpoints/epoch0.ckpt, weight: 1.0}, {path: runs/x/model}]
    method: delta_guided
    parameters: {gamma: 1.0}
    output: runs/x/fused
    evaluate: [{name: stsb, task: sts, path: data/stsb_dev.jsonl, score_range: [0, 5]}]   # optional
    instruction_template: "Instruction: {instruction} Query: "    # optional, as data.instruction_template
    passage_prefix: ""                                              # optional, as data.passage_prefix

Inputs: Lightning `.ckpt` files, Hugging Face or sentence-transformers folders, `.safetensors` files.
Folders and safetensors are read lazily and merged in slices (`fusion.engine`); a `.ckpt` is
memory-mapped after its CRC and weights-only pickle checks (`checkpoint_loading`; `--trust-checkpoint`
unpickles fully). A damaged file or a NaN / inf weight stops the merge with one line naming it. Inputs whose config.json architecture, tensor names or shapes differ from the
base, or that are too far from it to be fine-tuned copies, are refused before anything is written
(untrained tensors that only some inputs carry, such as the BERT pooler or `position_ids`, are left out).
The output (written atomically) keeps the template's pooling, normalisation and prompts: the base
folder's files, or for a `.ckpt`/`.safetensors` base the model it names (`--template` overrides); its
README.md is a model card (method, inputs, weights, parameters, scores). This module only parses:
the work is `codiemb_pl.workflows.fusion.fuse.fuse`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from codiemb_pl.commands import register_command
from codiemb_pl.commands.arguments import CommandParser, add_trust_checkpoint_argument
from codiemb_pl.errors import InputError
from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
from codiemb_pl.storage.output_paths import check_writable_folder

COMMAND = "codiemb fuse"
RECIPE_KEYS = ("base", "models", "method", "parameters", "output", "template", "seed", "evaluate",
               "instruction_template", "passage_prefix")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=COMMAND, description="Merge checkpoints fine-tuned from one base model.")
    parser.add_argument("--recipe", help="YAML recipe (base, models, method, parameters, output, evaluate)")
    parser.add_argument("--base", help="the shared base θ0: model folder, .safetensors or .ckpt")
    parser.add_argument("--model", action="append", dest="models", help="a checkpoint to merge; repeatable")
    parser.add_argument("--weights", nargs="+", type=float, help="one prior weight per --model")
    parser.add_argument("--method", help="a merge method of codiemb_pl.fusion.methods: delta_guided, uniform_soup, "
                                          "task_arithmetic, ties, dare, slerp, multi_slerp")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    parser.add_argument("--output", help="output sentence-transformers folder (replaced atomically)")
    parser.add_argument("--template", help="folder whose config, tokenizer and pooling the output keeps")
    parser.add_argument("--seed", type=int, help="seed of random methods (dare)")
    parser.add_argument("--mixed-lora", action="store_true",
                        help="merge LoRA checkpoints (base + s*B*A) together with full ones in weight space")
    add_trust_checkpoint_argument(parser)
    return parser


def read_recipe(path: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(path, "recipe not found", "check the path") from exc
    except yaml.YAMLError as exc:
        raise InputError(path, f"is not valid YAML ({exc})".replace("\n", " "), "fix the recipe") from exc
    if not isinstance(recipe, dict):
        raise InputError(path, "the recipe must be a mapping", f"use the keys {list(RECIPE_KEYS)}")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise InputError(path, f"unknown key(s) {unknown}", f"use {list(RECIPE_KEYS)}")
    return recipe


def resolve_request(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe values overridden by flags; models as [{path, weight}]."""
    request = read_recipe(args.recipe) if args.recipe else {}
    where = args.recipe or COMMAND
    if args.models:
        request["models"] = [{"path": path} for path in args.models]
    if args.weights is not None:
        models = request.get("models") or []
        if len(args.weights) != len(models):
            raise InputError("--weights", f"{len(args.weights)} weights for {len(models)} models", "give one per model")
        for model, weight in zip(models, args.weights):
            model["weight"] = weight
    for name in ("base", "method", "output", "template", "seed"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    if args.param:
        request["parameters"] = dict(request.get("parameters") or {}, **dict(_parse_param(p) for p in args.param))
    for name in ("base", "models", "method", "output"):
        if not request.get(name):
            raise InputError(where, f"no {name} given", f"pass --{name.rstrip('s')} or set `{name}` in the recipe")
    models = []
    for index, model in enumerate(request["models"]):
        model = {"path": model} if isinstance(model, str) else dict(model)
        if "path" not in model or set(model) - {"path", "weight"}:
            raise InputError(f"{where}: models[{index}]", f"expected {{path, weight}}, got {model}",
                             "e.g. {path: runs/x/model, weight: 1.0}")
        models.append(model)
    request["models"] = models
    from codiemb_pl.fusion.methods import MERGE_METHODS  # imports torch: after the arguments are read

    if request["method"] not in MERGE_METHODS:
        raise InputError(f"{where}: method", f"unknown or data-dependent merge method {request['method']!r}",
                         f"use one of {sorted(MERGE_METHODS)} (greedy soup / Self Positioning: CheckpointFusion)")
    return request


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--param {text}", "expected KEY=VALUE", "e.g. --param density=0.2")
    return key.strip(), yaml.safe_load(value)


@register_command("fuse")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with trusted_checkpoints(bool(args.trust_checkpoint)):
        return fuse_request(args)


def fuse_request(args: argparse.Namespace) -> int:
    """Merge, print where the result went and, with evaluation sets, its scores."""
    request = resolve_request(args)
    check_writable_folder(request["output"], "--output")  # before anything is read or merged
    from codiemb_pl.data.eval_builders import build_eval_sets
    from codiemb_pl.evaluation.tables import format_metrics_table
    from codiemb_pl.workflows.fusion.fuse import fuse

    sets = build_eval_sets(request.get("evaluate") or [],   # read before merging: bad data fails early
                                 instruction_template=request.get("instruction_template"),
                                 passage_prefix=request.get("passage_prefix"))
    result = fuse(request["base"], request["models"], request["method"], request["output"],
                  params=request.get("parameters") or {}, template=request.get("template"),
                  seed=int(request.get("seed") or 0), eval_sets=sets, mixed_lora=args.mixed_lora)
    print(f"[codiemb] fused {len(request['models'])} checkpoint(s) with {request['method']} into {result.output}",
          flush=True)
    if sets:
        print(format_metrics_table(result.per_set, result.summary, f"{request['method']} on the evaluation sets"),
              flush=True)
    return 0
