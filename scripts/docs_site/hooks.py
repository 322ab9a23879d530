"""MkDocs hooks of the documentation site (`mkdocs.yml`: `hooks: [scripts/docs_site/hooks.py]`).

- `on_files`: adds the pages and pictures generated from the code (`GENERATED`): the config reference of
  `codiemb fit`, the command reference, the file formats, the sampler's step plan per policy and the two flow
  diagrams. They exist only in the built site, so they cannot drift from the code.
- `on_page_content`: renders math to MathML (`math_mathml`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _import_paths() -> None:
    """This checkout's package and `scripts/` first on sys.path (MkDocs restores sys.path after loading a hook, so
    `on_config` repeats it): the pages describe this checkout's code, whatever else is installed."""
    for path in (REPO_ROOT / "scripts", REPO_ROOT):
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))


_import_paths()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from docs_site import command_reference, config_reference, diagrams, math_mathml, schema_reference  # noqa: E402


def _sampler_page() -> str:
    example = diagrams.EXAMPLE
    sources = ", ".join(f"`{n}` ({t}, {s} items)" for n, t, s in
                        zip(example["names"], example["tasks"], example["sizes"]))
    return "\n".join([
        "# The sampler's step plan, per policy", "",
        "Drawn when the site is built from `TaskBatchSampler.plan(0)` itself (`codiemb_pl/data/sampler.py`), for "
        f"one small example: {sources}, batch 8 on one device, seed {example['seed']}. Each cell is one optimizer "
        "step; every step trains one sub-dataset, except under the baselines `mixed` (naive co-training: IR and "
        "STS items in every micro-batch) and `joint` (one IR and one STS batch per step), whose steps hold IR (top) "
        "and STS (bottom) items.", "",
        "![step plan per policy](sampler-plan.svg)", "",
        diagrams.plan_table(), "",
        "How each policy orders the batches, and why `balanced` has more steps (it re-draws the smaller task until "
        "both tasks have as many steps as the larger one): [the method](../method.md#the-sampler).", "",
    ])


GENERATED = {
    "reference/config.md": config_reference.markdown,
    "reference/commands.md": command_reference.markdown,
    "reference/file-formats.md": schema_reference.markdown,
    "reference/sampler-plan.md": _sampler_page,
    "reference/sampler-plan.svg": diagrams.sampler_plan_svg,
    **{f"diagrams/{name}": (lambda steps=steps: diagrams.flow_svg(steps)) for name, steps in diagrams.FLOWS.items()},
}


def on_config(config):
    _import_paths()
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, make in GENERATED.items():
        started = time.perf_counter()
        files.append(File.generated(config, uri, content=make()))
        print(f"INFO    -  docs_site: generated {uri} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return files


def on_page_content(html, page, config, files):
    return math_mathml.render(html)
