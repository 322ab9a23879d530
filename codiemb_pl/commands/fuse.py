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

Inputs: Lightning `.ckpt` files, Hugging Face or sentence-transformers folders, `.safetensors` files.
Folders and safetensors are read lazily and merged in slices (`fusion.chunked`); a `.ckpt` is a
pickle, memory-mapped. Inputs whose config.json architecture, tensor names or shapes differ from the
base, or that are too far from it to be fine-tuned copies, are refused before anything is written
(untrained tensors that only some inputs carry, such as the BERT pooler or `position_ids`, are left out).
The output (written atomically) keeps the template's pooling, normalisation and prompts: the base
folder's files, or for a `.ckpt`/`.safetensors` base the model it names (`--template` overrides).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_directory
from ..cli import register_command
from ..data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from ..data.validation import ValidationSet
from ..encoder import TextEncoder
from ..errors import InputError
from ..evaluation.suite import evaluate_encoder
from ..fusion.checkpoints import (WEIGHT_FILE_SUFFIXES, WEIGHT_INDEX_NAMES, OpenedCheckpoint, check_same_architecture,
                                  check_shares_base, drop_unshared_untrained_keys, open_checkpoint,
                                  transformer_folder)
from ..fusion.chunked import ChunkedMerge, write_safetensors
from ..fusion.methods import MERGE_METHODS
from ..reporting import format_metrics_table

COMMAND = "codiemb fuse"
RECIPE_KEYS = ("base", "models", "method", "parameters", "output", "template", "seed", "evaluate")
INSTRUCTION_TEMPLATE = "Instruction: {instruction} Query: "


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `InputError`s (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(COMMAND, message, f"see `{COMMAND} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=COMMAND, description="Merge checkpoints fine-tuned from one base model.")
    parser.add_argument("--recipe", help="YAML recipe (base, models, method, parameters, output, evaluate)")
    parser.add_argument("--base", help="the shared base θ0: model folder, .safetensors or .ckpt")
    parser.add_argument("--model", action="append", dest="models", help="a checkpoint to merge; repeatable")
    parser.add_argument("--weights", nargs="+", type=float, help="one prior weight per --model")
    parser.add_argument("--method", help=f"one of {sorted(MERGE_METHODS)}")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    parser.add_argument("--output", help="output sentence-transformers folder (replaced atomically)")
    parser.add_argument("--template", help="folder whose config, tokenizer and pooling the output keeps")
    parser.add_argument("--seed", type=int, help="seed of random methods (dare)")
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
    if request["method"] not in MERGE_METHODS:
        raise InputError(f"{where}: method", f"unknown or data-dependent merge method {request['method']!r}",
                         f"use one of {sorted(MERGE_METHODS)} (greedy soup / Self Positioning: CheckpointFusion)")
    return request


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--param {text}", "expected KEY=VALUE", "e.g. --param density=0.2")
    return key.strip(), yaml.safe_load(value)


def prior_weights(models: list[dict[str, Any]]) -> list[float] | None:
    weights = [model.get("weight") for model in models]
    if all(weight is None for weight in weights):
        return None
    return [1.0 if weight is None else float(weight) for weight in weights]


def _ignore_weights(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(WEIGHT_FILE_SUFFIXES) or n in WEIGHT_INDEX_NAMES or n == "README.md"]


def write_template(base: OpenedCheckpoint, template: str | None, staging: Path) -> Path:
    """Put the non-weight files of the output into `staging`; returns the folder that takes the weights."""
    folder = Path(template or base.model_folder or "")
    if not (template or base.model_folder) or not (folder / "config.json").is_file() and \
            not (folder / "modules.json").is_file():
        raise InputError(base.path, "cannot tell which model folder the output's config and tokenizer come from",
                         "pass --template MODEL_FOLDER (or `template:` in the recipe)")
    if (folder / "modules.json").is_file() and not base.encoder_settings:
        shutil.copytree(folder, staging, ignore=_ignore_weights, dirs_exist_ok=True)
        return transformer_folder(staging)
    encoder = TextEncoder(str(folder), **base.encoder_settings)   # adds the sentence-transformers files
    encoder.save(staging / ".template")
    del encoder
    for item in (staging / ".template").iterdir():
        if item.name not in ("model.safetensors", "README.md"):
            item.rename(staging / item.name)
    shutil.rmtree(staging / ".template")
    return staging


def fuse(request: dict[str, Any]) -> Path:
    """Check the inputs, merge them and write the output folder; returns its path."""
    base = open_checkpoint(request["base"])
    models = [open_checkpoint(model["path"]) for model in request["models"]]
    check_same_architecture(base, models)
    base_source, *model_sources = drop_unshared_untrained_keys([base.source] + [m.source for m in models])
    merge = ChunkedMerge(base_source, model_sources, request["method"],
                         request.get("parameters") or {}, weights=prior_weights(request["models"]),
                         seed=int(request.get("seed") or 0))
    check_shares_base(base_source, model_sources, merge.keys, [m.path for m in models])
    output = Path(request["output"])
    with atomic_directory(output) as staging:
        weights_folder = write_template(base, request.get("template"), staging)
        write_safetensors(merge, weights_folder / "model.safetensors",
                          metadata={"codiemb_fuse_method": request["method"]})
    return output


def evaluation_sets(entries: list[dict[str, Any]]) -> list[ValidationSet]:
    sets = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"evaluate[{index}]", f"expected a source mapping, got {entry!r}",
                             "e.g. {name: stsb, task: sts, path: data/stsb_dev.jsonl}")
        source = SourceConfig(**entry)
        prefix = INSTRUCTION_TEMPLATE.format(instruction=source.instruction) if source.instruction else ""
        if source.task == "sts":
            sets.append(ValidationSet.from_sts(source.name, load_sts_pairs(source), prefix))
        else:
            sets.append(ValidationSet.from_ir(source.name, load_ir_corpus(source), prefix))
    return sets


@register_command("fuse")
def main(argv: list[str]) -> int:
    request = resolve_request(build_parser().parse_args(argv))
    sets = evaluation_sets(list(request.get("evaluate") or []))   # read before merging: bad data fails early
    output = fuse(request)
    print(f"[codiemb] fused {len(request['models'])} checkpoint(s) with {request['method']} into {output}", flush=True)
    if sets:
        per_set, summary = evaluate_encoder(TextEncoder.load(output), sets)
        print(format_metrics_table(per_set, summary, f"{request['method']} on the evaluation sets"), flush=True)
    return 0
