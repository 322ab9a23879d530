"""The training dataset over the cached Arrow tables: sub-datasets concatenated in config order, indexed by
the sampler's `(global_index, epoch)` keys, each item read from the memory-mapped records and token tables.

No texts are held as Python objects: an item is one row's token ids, read when the collate asks for it (and,
with `with_texts`, that row's texts, for an online teacher).
The dataset pickles as file paths (`MappedTable`), so DataLoader workers map the same files.
`tokenized_items` gives a few chosen records as the same items without a token cache (Self Positioning's probe).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import pyarrow as pa
from torch.utils.data import Dataset

from codiemb_pl.data.cache.entries import MappedTable
from codiemb_pl.data.cache.records import RecordTable, open_records
from codiemb_pl.data.cache.token_ids import TokenLimits, reference_encoder, token_batch
from codiemb_pl.data.cache.tokens import open_tokens
from codiemb_pl.data.collate import TokenizedItem
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.model.pooling import prefix_token_count


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for the per-item random choices (which positives/negatives), identical on every rank."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ArrowTrainingDataset(Dataset):
    """Concatenated sub-datasets read from the Arrow cache; `tokenize` must run before items are read."""

    def __init__(self, sources: list[SourceConfig], prefixes: list[str], seed: int, cache_dir: Path, *,
                 rebuild: bool = False, verify: bool = False, with_texts: bool = False):
        self.names = [source.name for source in sources]
        self.tasks = [source.task for source in sources]
        self.prefixes, self.seed = list(prefixes), seed
        self.cache_dir, self.rebuild, self.verify = Path(cache_dir), rebuild, verify
        self.with_texts = with_texts   # items carry their texts (an online teacher reads them)
        self.records: list[RecordTable] = [open_records(source, self.cache_dir, rebuild=rebuild, verify=verify)
                                           for source in sources]
        self.tokens: Optional[list[MappedTable]] = None
        self.prefix_tokens: list[int] = []
        self.offsets = [0]
        for table in self.records:
            self.offsets.append(self.offsets[-1] + len(table))

    @property
    def sizes(self) -> list[int]:
        return [len(table) for table in self.records]

    def tokenize(self, tokenizer, limits: TokenLimits) -> None:
        """Open (building once) each sub-dataset's token table for this tokenizer and these limits."""
        opened = [open_tokens(records, tokenizer, limits, prefix, self.cache_dir, rebuild=self.rebuild,
                              verify=self.verify)
                  for records, prefix in zip(self.records, self.prefixes)]
        self.tokens = [mapped for mapped, _ in opened]
        self.prefix_tokens = [int(meta["prefix_tokens"]) for _, meta in opened]

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, global_index: int) -> tuple[int, int]:
        if not 0 <= global_index < len(self):
            raise IndexError(global_index)
        source = bisect.bisect_right(self.offsets, global_index) - 1
        return source, global_index - self.offsets[source]

    def __getitem__(self, key: tuple[int, int]) -> TokenizedItem:
        if self.tokens is None:
            raise RuntimeError("ArrowTrainingDataset.tokenize(...) must run before items are read")
        global_index, epoch = key
        source, local = self.locate(global_index)
        row = self.records[source].row(local)
        return read_item(self.records[source], self.tokens[source].column, row, row, dataset=self.names[source],
                         prefix_tokens=self.prefix_tokens[source], seed=item_seed(self.seed, epoch, global_index),
                         with_texts=self.with_texts)


def read_item(records: RecordTable, tokens: Callable[[str], pa.ChunkedArray | pa.Array], record_row: int,
              token_row: int, *, dataset: str, prefix_tokens: int, seed: int, with_texts: bool = False) -> TokenizedItem:
    """The item of table row `record_row` of `records`, its ids at row `token_row` of the token columns `tokens`
    (with its texts when `with_texts`)."""
    texts = records.mapped.column
    common = dict(dataset=dataset, task=records.meta["task"], prefix_tokens=prefix_tokens, seed=seed)
    if records.meta["task"] == "ir":
        if with_texts:
            common["texts"] = (texts("query")[record_row].as_py(), *texts("positives")[record_row].as_py(),
                               *texts("negatives")[record_row].as_py())
        return TokenizedItem(**common, query=tokens("query")[token_row].as_py(),
                             positives=tokens("positives")[token_row].as_py(),
                             negatives=tokens("negatives")[token_row].as_py(),
                             positive_text_ids=texts("positive_text_ids")[record_row].as_py(),
                             negative_text_ids=texts("negative_text_ids")[record_row].as_py(),
                             teacher_scores=texts("teacher_scores")[record_row].as_py())
    if with_texts:
        common["texts"] = (texts("text1")[record_row].as_py(), texts("text2")[record_row].as_py())
    return TokenizedItem(**common, text1=tokens("text1")[token_row].as_py(), text2=tokens("text2")[token_row].as_py(),
                         score=records.normalised_score(texts("score")[record_row].as_py()),
                         teacher_score=texts("teacher_score")[record_row].as_py())


def tokenized_items(records: RecordTable, indices: Sequence[int], seeds: Sequence[int], tokenizer,
                    limits: TokenLimits, prefix: str, dataset: str) -> list[TokenizedItem]:
    """The run's `indices`-th records of `records` as items (seed `seeds[k]` for the k-th), their ids computed now
    as the token cache computes them (`token_ids.reference_encoder`: `tokenizer(prefix + text, truncation=True,
    max_length=L)`), for a few records that do not warrant a token table."""
    rows = records.table_rows(indices)
    tokens = token_batch(reference_encoder(tokenizer), records.table.take(pa.array(rows)), records.meta["task"], limits,
                         prefix)
    count = prefix_token_count(tokenizer, prefix)
    return [read_item(records, tokens.column, int(row), position, dataset=dataset, prefix_tokens=count, seed=seed)
            for position, (row, seed) in enumerate(zip(rows, seeds))]
