"""Token-budget batch sizes (`data.ir_batch_tokens`, `data.sts_batch_tokens`): a sub-dataset's per-device batch size
from a budget B of tokens per micro-batch and the token lengths of its texts in the token cache:

    t_i = Σ_g slots_g · q95(lengths of the texts of group g)     tokens one record of sub-dataset i encodes
    b_i = max(1, ⌊B / t_i⌋)

Groups and slots: IR, the query (1), the positives (`n_positives`) and the hard negatives (`n_negatives`, when the
sub-dataset has any negative: without any, the collate builds no negative group); STS, `text1` and `text2` (1
each). The lengths are the token cache's (`cache/tokens.py`): the ids the collate pads, instruction prefix and
special tokens included, already truncated at the configured caps (`TokenLimits`).

Why the 95th percentile and not the mean: the padded path pads a group to its longest text, so a micro-batch costs
rows × (nearly) the longest length of each group; read against the mean, a budget would be overrun on every source
with a long tail of lengths (passages), read against the maximum, one outlier would shrink the whole source's batch.
Padding-free steps cost Σ lengths (about the mean), so for them the budget is an upper bound.

Cost: a histogram of the lengths (one bin per token count, up to the cap) summed chunk by chunk over the token
table's list offsets (`pyarrow.compute.list_value_length`), never over the ids: memory O(cap + one chunk's rows) at
any record count. The percentile is exact, so every rank, reading the same cache, computes the same sizes without a
collective; they are computed once, before the sampler is built, so the epoch plan and a resume are those of a run
configured with these batch sizes. `budget_batch_sizes` applies this to a run's sources (`CoDiEmbDataModule` calls
it once, before its sampler, and prints its lines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PERCENTILE = 95
"""The length each slot of a record is counted at (module docstring)."""


def length_histogram(column: pa.ChunkedArray) -> np.ndarray:
    """`histogram[L]` = number of texts of `column` (list<int32> ids, or list<list<int32>> for the passages of a
    record) with L tokens, read chunk by chunk from the list offsets."""
    histogram = np.zeros(1, dtype=np.int64)
    for chunk in column.chunks:
        texts = chunk.flatten() if pa.types.is_list(chunk.type.value_type) else chunk
        counts = np.bincount(pc.list_value_length(texts).fill_null(0).to_numpy(zero_copy_only=False))
        if len(counts) > len(histogram):
            histogram = np.pad(histogram, (0, len(counts) - len(histogram)))
        histogram[:len(counts)] += counts
    return histogram


def histogram_percentile(histogram: np.ndarray, percent: int = PERCENTILE) -> int:
    """The smallest length L with at least `percent` % of the texts no longer than L (0 without texts)."""
    total = int(histogram.sum())
    if total == 0:
        return 0
    needed = -(-percent * total // 100)   # ⌈percent·total/100⌉ texts, in integers
    return int(np.searchsorted(np.cumsum(histogram), needed))


def tokens_per_record(task: str, column: Callable[[str], pa.ChunkedArray], n_positives: int, n_negatives: int) -> int:
    """t_i of a sub-dataset (module docstring) from its token table's columns (`column(name)`)."""
    if task != "ir":
        return sum(histogram_percentile(length_histogram(column(name))) for name in ("text1", "text2"))
    negatives = length_histogram(column("negatives"))
    negative_slots = n_negatives if negatives.sum() else 0
    return (histogram_percentile(length_histogram(column("query")))
            + n_positives * histogram_percentile(length_histogram(column("positives")))
            + negative_slots * histogram_percentile(negatives))


def budget_batch_size(budget: int, per_record: int) -> int:
    """b_i = max(1, ⌊budget / t_i⌋)."""
    return max(1, budget // max(per_record, 1))


def budget_batch_sizes(sources: Sequence[Any], token_columns: Sequence[Callable[[str], pa.ChunkedArray]],
                       budgets: dict[str, int], n_positives: int, n_negatives: int
                       ) -> tuple[list[Optional[int]], list[str], list[str]]:
    """Per source (a `SourceConfig`, its token table's `column`), its batch size from its task's budget in `budgets`
    (None: no budget, or the source's own `batch_size`, which wins); with one line per source that has a budget and
    one warning per source whose budget is below one record's tokens (it gets batch size 1)."""
    sizes: list[Optional[int]] = []
    lines, warnings = [], []
    for source, column in zip(sources, token_columns):
        option, budget, size = f"data.{source.task}_batch_tokens", budgets[source.task], None
        if budget and source.batch_size:
            lines.append(f"[codiemb] {source.name} ({source.task}): its own batch_size {source.batch_size} wins over "
                         f"{option} {budget}")
        elif budget:
            per_record = tokens_per_record(source.task, column, n_positives, n_negatives)
            size = budget_batch_size(budget, per_record)
            lines.append(f"[codiemb] {source.name} ({source.task}): batch size {size} per device from {option} "
                         f"{budget} (~{per_record} tokens per record at the {PERCENTILE}th percentile lengths)")
            if budget < per_record:
                warnings.append(f"[codiemb] {option} {budget} is below the ~{per_record} tokens of one record of "
                                f"{source.name}: batch size 1; raise the budget")
        sizes.append(size)
    return sizes, lines, warnings
