"""The token cache's first build over worker processes: ranges of rows tokenised by light `spawn`ed processes.

Processes: `spawn`ed (nothing is forked from a process that may hold threads, DDP's or the tokenizer's own),
each importing only numpy, pyarrow, tokenizers and the torch-free modules `token_ids` and `text_bound` (no
torch, no transformers: `tests/test_token_ids.py` checks a worker's `sys.modules`). Each tokenises `RANGE_ROWS`
rows at a time with `TOKENIZERS_PARALLELISM=false`, through its own memory map of the records file opened for
that range only (so the file's pages it holds are one range's, whatever the table's size). The results come
back in row order, at most `WINDOW_PER_PROCESS` ranges per process submitted ahead of the one being written, so
the building process holds a bounded number of finished ranges.
How many: `CODIEMB_TOKENIZE_PROCESSES`, else the CPUs this process may run on; 1 = in this process.
Tables of fewer than two ranges are tokenised in this process (a process start costs ~1 s).
The processes start with `__main__` hidden (`_main_hidden`): they do not re-run the caller's script, so a
script that calls `fit` needs no `if __name__ == "__main__":` guard for them.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from codiemb_pl.data.cache.token_ids import (
    CHECK_ROWS,
    BackendSpec,
    TokenLimits,
    backend_encoder,
    choose_encoder,
    token_batch,
)
from codiemb_pl.errors import InputError

PROCESSES_ENV = "CODIEMB_TOKENIZE_PROCESSES"
RANGE_ROWS = 4096
"""Rows per task given to a worker process (4096 IR records: 28 672 texts, a few seconds of work)."""
WINDOW_PER_PROCESS = 2
"""Ranges per process submitted and not yet written: enough to keep every process busy, few enough that
finished ranges do not pile up in the building process when writing is slower than tokenising."""


def process_count() -> int:
    configured = os.environ.get(PROCESSES_ENV, "").strip()
    if configured:
        if not configured.isdigit():
            raise InputError(PROCESSES_ENV, f"{configured!r} is not a process count",
                             "set it to a whole number (1: tokenise in the building process) or unset it")
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------- in the worker processes

_WORKER: dict = {}


def _start_worker(records_path: str, spec: BackendSpec, task: str, limits: TokenLimits, prefix: str,
                  range_rows: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    _WORKER.update(records_path=records_path, encode=backend_encoder(spec), task=task, limits=limits, prefix=prefix,
                   range_rows=range_rows)


def _tokenise_range(start: int) -> pa.RecordBatch:
    """The token columns of rows `[start, start + range_rows)`, read through a memory map of the records file
    opened for this range only: its pages leave the process with the range, so a worker's resident pages
    stay those of one range, not of every range it has read."""
    with pa.memory_map(_WORKER["records_path"], "r") as source:
        rows = pa.ipc.open_file(source).read_all().slice(start, _WORKER["range_rows"])
        return token_batch(_WORKER["encode"], rows, _WORKER["task"], _WORKER["limits"], _WORKER["prefix"])


def loaded_modules() -> list[str]:
    """The modules imported in the calling process (submitted to a worker: what a worker loaded)."""
    return sorted(sys.modules)


# ------------------------------------------------------------------------------- in the building process

def tokeniser_pool(records_path: Path, spec: BackendSpec, task: str, limits: TokenLimits, prefix: str,
                   processes: int, range_rows: int = RANGE_ROWS) -> ProcessPoolExecutor:
    """A pool of `processes` spawned workers, each holding the mapped records file and the backend copies."""
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(str(records_path), spec, task, limits, prefix, range_rows))


def ordered_map(pool: Executor, function: Callable[[Any], Any], arguments: Iterable, window: int) -> Iterator:
    """`function(argument)` for each argument, in order, with at most `window` submitted beyond the result being
    handed over. The first `window` submissions (which start the pool's processes) are made with `__main__`
    hidden."""
    arguments = iter(arguments)
    pending: collections.deque[Future] = collections.deque()
    with _main_hidden():
        for argument in arguments:
            pending.append(pool.submit(function, argument))
            if len(pending) == window:
                break
    while pending:
        result = pending.popleft().result()
        for argument in arguments:
            pending.append(pool.submit(function, argument))
            break
        yield result


def token_batches(tokenizer, records_path: Path, table: pa.Table, task: str, limits: TokenLimits, prefix: str,
                  processes: Optional[int] = None, range_rows: int = RANGE_ROWS) -> Iterator[pa.RecordBatch]:
    """The token columns of every row of `table` (the memory-mapped file `records_path`), in row order, in
    batches of `range_rows` rows."""
    encode, spec = choose_encoder(tokenizer, table.slice(0, CHECK_ROWS), task, limits, prefix)
    processes = process_count() if processes is None else processes
    starts = range(0, table.num_rows, range_rows)
    if spec is None or processes < 2 or len(starts) < 2 or multiprocessing.current_process().daemon:
        for batch in table.to_batches(max_chunksize=range_rows):
            yield token_batch(encode, batch, task, limits, prefix)
        return
    processes = min(processes, len(starts))
    with tokeniser_pool(records_path, spec, task, limits, prefix, processes, range_rows) as pool:
        yield from ordered_map(pool, _tokenise_range, starts, WINDOW_PER_PROCESS * processes)


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Hide `__main__`'s file and spec from `spawn`, so that the tokeniser processes, which need nothing from
    it, do not re-run the caller's script (an unguarded script calling `fit` would run again in each)."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__spec__", "__file__") if main is not None and key in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
