"""Seeded random subsets of training sources, written as JSON-lines files (BOOM's bagged runs, the benchmarks).

    |S_j| = max(1, round(f·|D_j|))  records of sub-dataset D_j, drawn with seed key_seed(seed, D_j's name)

The subset is drawn from the records the source yields (after its own `max_samples`, read from its records
table); the files keep name, task, instruction and batch size, and STS files hold normalised scores.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codiemb_pl.data.cache.records import opened_records
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.fusion.keys import key_seed
from codiemb_pl.storage.atomic import atomic_write_text


def subset_size(total: int, fraction: float) -> int:
    """max(1, round(fraction·total)), never more than total."""
    return min(total, max(1, round(fraction * total)))


def subset_indices(total: int, fraction: float, seed: int, source_name: str) -> list[int]:
    """Sorted indices of a seeded random subset of `subset_size(total, fraction)` items of one sub-dataset."""
    rng = random.Random(key_seed(seed, source_name))
    return sorted(rng.sample(range(total), subset_size(total, fraction)))


def write_subset_sources(sources: Sequence[SourceConfig], fraction: float, seed: int,
                         folder: str | Path) -> list[SourceConfig]:
    """Write each source's seeded subset to `folder/<name>.jsonl`; return sources reading those files.

    The subset is drawn from the records the source yields (after its own `max_samples`), read from its
    records table (`RecordTable.json_rows`); name, task, instruction and batch size are kept; STS files hold
    normalised scores (`score_range: [0, 1]`).
    """
    folder = Path(folder)
    subset_sources = []
    for source in sources:
        path = folder / f"{source.name}.jsonl"
        with opened_records(source) as records:
            chosen = records.json_rows(subset_indices(len(records), fraction, seed, source.name))
            atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chosen))
        subset_sources.append(SourceConfig(name=source.name, task=source.task, path=str(path.resolve()),
                                           format="jsonl", score_range=[0.0, 1.0] if source.task == "sts" else None,
                                           instruction=source.instruction, batch_size=source.batch_size))
    return subset_sources


def source_dict(source: SourceConfig) -> dict[str, Any]:
    """The non-default fields of a SourceConfig, as a fit config lists them."""
    fields = ("name", "task", "path", "format", "split", "columns", "score_range", "instruction", "batch_size",
              "max_samples", "seed", "subset")
    return {name: getattr(source, name) for name in fields if getattr(source, name) not in (None, "auto")}
