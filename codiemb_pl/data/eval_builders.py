"""Evaluation sets (`EvalSet`) from source configs, built one way for training's validation and test,
`codiemb evaluate`, `codiemb fuse` recipes and `codiemb boom`.

A source with an `instruction` gets the prefix `instruction_template.format(instruction=...)` on its
queries (IR) or on both sentences (STS); IR documents get `passage_prefix`. Prefix tokens are left out
of pooling when the set is encoded (`model.pooling.prefix_pooling_mask`). Sets are read and checked
completely before any model is loaded, so bad data fails early; set names must be unique (they key the
metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE, instruction_prefix
from codiemb_pl.data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from codiemb_pl.errors import InputError

SOURCE_EXAMPLE = "e.g. {name: stsb, task: sts, path: data/stsb_dev.jsonl}"


def as_source_config(entry: SourceConfig | Mapping[str, Any], where: str) -> SourceConfig:
    """`entry` itself, or the `SourceConfig` a mapping (YAML / JSON) describes; anything else is an `InputError`."""
    if isinstance(entry, SourceConfig):
        return entry
    if not isinstance(entry, Mapping):
        raise InputError(where, f"expected a source mapping, got {entry!r}", SOURCE_EXAMPLE)
    try:
        return SourceConfig(**entry)
    except TypeError as error:
        raise InputError(where, f"bad source ({error})", f"use the fields of data.train entries, {SOURCE_EXAMPLE}"
                         ) from None


def build_eval_set(source: SourceConfig, instruction_template: str = INSTRUCTION_TEMPLATE,
                         passage_prefix: str = "") -> EvalSet:
    """One set: STS pairs, or a BEIR split (judged queries, the whole corpus, qrels)."""
    prefix = instruction_prefix(source.instruction, instruction_template)
    if source.task == "sts":
        return EvalSet.from_sts(source.name, load_sts_pairs(source), prefix)
    return EvalSet.from_ir(source.name, load_ir_corpus(source), prefix, passage_prefix or "")


def build_eval_sets(source_configs: Iterable[SourceConfig | Mapping[str, Any]], *,
                          instruction_template: str | None = INSTRUCTION_TEMPLATE, passage_prefix: str | None = "",
                          where: str = "evaluate") -> list[EvalSet]:
    """Every set of `source_configs` (`SourceConfig`s or mappings), in order; `where` names the list in errors.

    `None` template / prefix mean the defaults (`INSTRUCTION_TEMPLATE`, no passage prefix), as an unset
    key of a fit config does.
    """
    sources = [as_source_config(entry, f"{where}[{index}]") for index, entry in enumerate(source_configs)]
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise InputError(f"{where} {source.name}", "two sets share this name", "give every set its own NAME")
        seen.add(source.name)
    return [build_eval_set(source, instruction_template or INSTRUCTION_TEMPLATE, passage_prefix or "")
            for source in sources]
