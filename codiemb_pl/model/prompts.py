"""Which sentence-transformers prompts a trained or fused model carries, and how prompts leave pooling.

Training puts an instruction prefix (`data.instruction_template` filled with a sub-dataset's `instruction`)
before its queries (IR) or both sentences (STS) and leaves the prefix out of mean pooling. An export
names each prefix as a prompt, so sentence-transformers reproduces the training embedding:

    <sub-dataset name>   every instruction, named after the first sub-dataset that uses it
    query                the instruction of the first IR sub-dataset that has one, in `data.train` order
                         (what `SentenceTransformer.encode_query` and `prompt_name="query"` use)
    document             `data.passage_prefix` when set (what validation put before IR documents;
                         `encode_document` uses it)

(a sub-dataset itself named `query` or `document` gives its name to the role).

Why the first IR sub-dataset in config order: the rule needs nothing but the config (no data read), so it
gives the same `query` wherever prompts are derived, and the user chooses by listing the main retrieval
source first; STS instructions never become `query` (they describe symmetric similarity, not search). The
model card lists every prompt. No `default_prompt_name` is set: plain `encode` stays prompt-free, as
training's documents were.

`include_prompt` is sentence-transformers' Pooling switch: False (mean pooling) leaves prompt tokens and
[CLS] out of the mean, as training leaves its prefixes out; `cls` / `last` pooling keep True (their token is
the same either way, and False would move `cls` to the first token after the prompt).

A fused model keeps the prompt settings of its members (`members_prompt_settings`): those of the first
member that declares prompts, with one line naming any member that declares different ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from codiemb_pl.model.st_folder import module_kind, read_json_file, read_modules, read_settings
from codiemb_pl.storage.atomic import atomic_write_text

QUERY, DOCUMENT = "query", "document"


def instruction_prompts(sources: Iterable[Any], prefix_for: Callable[[Optional[str]], str],
                        passage_prefix: str = "") -> dict[str, str]:
    """The named prompts of a model trained on `sources` (objects with `name`, `task`, `instruction`, in config
    order); `prefix_for(instruction)` is the prefix training put before the texts. See the module docstring."""
    named: dict[str, str] = {}
    query = ""
    for source in sources:
        prefix = prefix_for(source.instruction) if source.instruction else ""
        if not prefix:
            continue
        if prefix not in named.values():
            named[source.name] = prefix
        if source.task == "ir" and not query:
            query = prefix
    roles = {QUERY: query, DOCUMENT: passage_prefix or ""}
    return {**{name: prefix for name, prefix in named.items() if name not in roles or not roles[name]},
            **{name: prefix for name, prefix in roles.items() if prefix}}


def include_prompt_for(pooling: str) -> bool:
    """sentence-transformers' `include_prompt` that reproduces training's pooling (see the module docstring)."""
    return pooling != "mean"


@dataclass(frozen=True)
class PromptSettings:
    """The prompt part of a sentence-transformers folder: named prompts, the default, and the Pooling switch."""

    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    include_prompt: bool = True


def folder_prompt_settings(location: str | Path) -> Optional[PromptSettings]:
    """The prompt settings a local sentence-transformers folder declares (config_sentence_transformers.json and
    its Pooling module's config.json, read by `st_folder.read_settings` without importing transformers); None
    for anything else (a `.safetensors`, a `.ckpt`, a plain Hugging Face folder)."""
    settings = read_settings(Path(location))
    if settings is None:
        return None
    return PromptSettings(settings.prompts, settings.default_prompt_name, settings.include_prompt)


def members_prompt_settings(members: Sequence[tuple[str, Optional[PromptSettings]]]
                            ) -> tuple[Optional[PromptSettings], list[str]]:
    """(settings, notes) for a model fused from `members` ((label, settings or None)): the settings of the first
    member that declares prompts (None when none does), and one note naming the members that declare other
    prompts or another `include_prompt` (their prompts are not carried over)."""
    declared = [(label, settings) for label, settings in members if settings is not None and settings.prompts]
    if not declared:
        return None, []
    (first_label, chosen), others = declared[0], declared[1:]
    differ = [label for label, settings in others
              if (settings.prompts, settings.default_prompt_name, settings.include_prompt)
              != (chosen.prompts, chosen.default_prompt_name, chosen.include_prompt)]
    notes = [f"members declare different prompts: the fused model takes {first_label}'s "
             f"({', '.join(sorted(chosen.prompts))}; include_prompt {chosen.include_prompt}), not those of "
             f"{', '.join(differ)}"] if differ else []
    return chosen, notes


def apply_prompt_settings(encoder: Any, settings: PromptSettings) -> None:
    """Give a `TextEncoder` these prompts, default and Pooling switch (it saves them with the folder)."""
    encoder.prompts = dict(settings.prompts)
    encoder.default_prompt_name = settings.default_prompt_name
    encoder.include_prompt = settings.include_prompt


def write_prompt_settings(folder: str | Path, settings: PromptSettings) -> None:
    """Put `settings` into a sentence-transformers folder being written (config_sentence_transformers.json and
    the Pooling module's config.json), keeping every other entry."""
    folder = Path(folder)
    config_file = folder / "config_sentence_transformers.json"
    config = read_json_file(config_file) or {}
    config.update({"prompts": dict(settings.prompts), "default_prompt_name": settings.default_prompt_name})
    atomic_write_text(config_file, json.dumps(config, indent=2) + "\n")
    for module in read_modules(folder) or []:
        if module_kind(module) == "Pooling":
            pooling_file = folder / (module.get("path") or "") / "config.json"
            pooling = read_json_file(pooling_file) or {}
            pooling["include_prompt"] = settings.include_prompt
            atomic_write_text(pooling_file, json.dumps(pooling, indent=2) + "\n")
