"""A rank's start-of-fit data structures do not grow with the number of records, and its DataLoader workers fork
with its objects frozen (issue 26).

Beyond the memory-mapped tables, what a rank builds from its training data before and while it trains (the
sampler's plan of an epoch, the hard-negative and teacher-score statistics `CoDiEmbModule.on_fit_start` reports)
must cost at most a few bytes per record: the issue measured ~1 000 MB per million records per rank when they
were Python lists and whole-column copies. Measured here exactly, at two sizes of a synthetic records table: the
peak of Python and numpy allocations (`tracemalloc`, which numpy reports to) plus Arrow's (a proxy memory pool
set as the default) while the work runs and its results are alive. The growth per added record must stay under
`BYTES_PER_RECORD`; the list planner and the whole-column statistics cost 315 bytes per record here.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset

from codiemb_pl.data.cache import records as records_module
from codiemb_pl.data.cache.entries import MappedTable, write_arrow
from codiemb_pl.data.cache.records import IR_SCHEMA, RecordTable, distinct_negative_histogram, teacher_score_count
from codiemb_pl.data.datamodule import ResumableDataLoader
from codiemb_pl.data.sampler import TaskBatchSampler
from codiemb_pl.evaluation.tables import hard_negative_report

SMALL, LARGE = 20_000, 200_000
BYTES_PER_RECORD = 40
"""An epoch's plan is one int64 per item (8 bytes) plus a few per global batch; statistics are streamed."""


def synthetic_records(folder, rows: int, seed: int = 0) -> RecordTable:
    """An IR records table of `rows` rows in the cache's layout (4096-row batches): short texts, 4 negatives
    each with random text ids from a small range (so some repeat), no teacher scores."""
    rng = np.random.default_rng(seed)
    path = folder / f"records_{rows}.arrow"

    def batches():
        for start in range(0, rows, 4096):
            count = min(4096, rows - start)
            lists = lambda width, values: pa.ListArray.from_arrays(  # noqa: E731
                pa.array(np.arange(count + 1, dtype=np.int32) * width), values)
            yield pa.record_batch([
                pa.array(["q"] * count), lists(2, pa.array(["p"] * (2 * count))),
                lists(4, pa.array(["n"] * (4 * count))), lists(2, pa.array(rng.integers(0, 1 << 40, 2 * count))),
                lists(4, pa.array(rng.integers(0, 5, 4 * count))), pa.nulls(count, pa.list_(pa.float64()))],
                schema=IR_SCHEMA)

    write_arrow(path, IR_SCHEMA, batches())
    return RecordTable(folder, f"synthetic-{rows}", MappedTable(path), {"rows": rows, "task": "ir"}, None)


def start_of_fit_work(records: RecordTable) -> list:
    """What a rank computes from its data at the start of a fit and keeps while it trains an epoch: the
    statistics the module reports, and the sampler with its first micro-batch taken (its plan alive)."""
    report = hard_negative_report("ir", distinct_negative_histogram(records), 4)
    scored = teacher_score_count(records)
    sampler = TaskBatchSampler([len(records), len(records) // 2], ["ir", "sts"], [8, 8], world_size=2, rank=0)
    iterator = iter(sampler)
    first = next(iterator)
    return [report, scored, sampler, iterator, first]


def peak_bytes(records: RecordTable) -> int:
    """Peak Python + numpy + Arrow bytes allocated while `start_of_fit_work` runs and its results are alive."""
    arrow = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        alive = start_of_fit_work(records)
        python_peak = tracemalloc.get_traced_memory()[1]
        del alive
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return python_peak + arrow.max_memory()


def test_start_of_fit_memory_does_not_grow_with_the_records(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "STATISTICS_ROWS", 8192)  # both sizes read whole slices: a fixed cost
    small, large = synthetic_records(tmp_path, SMALL), synthetic_records(tmp_path, LARGE)
    peak_bytes(small)  # warm up: first-use caches (imports, kernels) are not per record
    growth = (peak_bytes(large) - peak_bytes(small)) / (LARGE - SMALL)
    assert growth < BYTES_PER_RECORD, f"{growth:.1f} bytes per added record (at most {BYTES_PER_RECORD})"


class FreezeCounts(Dataset):
    """Each item: how many objects the collector of the process reading it holds frozen."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return gc.get_freeze_count()


def test_dataloader_workers_fork_with_the_ranks_objects_frozen():
    loader = ResumableDataLoader(FreezeCounts(), batch_sampler=[[0], [1]], num_workers=1,
                                 collate_fn=lambda items: items[0])
    in_worker = list(loader)
    assert min(in_worker) > 10_000  # the rank's objects (modules, functions, its data's metadata) are frozen there
    assert gc.get_freeze_count() == 0  # and the rank's own collector takes them back
