"""LightningDataModule: sub-datasets -> single-task global batches -> tokenised micro-batches.

Training uses `TaskBatchSampler` (SPEC §2): the trainer must run with `use_distributed_sampler=False`
(the CLI sets it) because the sampler already shards each global batch across ranks. The data loader
is resumable: its sampler's position is stored in Lightning checkpoints and restored on `--ckpt_path`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from codiemb_pl.data.cache.dataset import ArrowTrainingDataset, item_seed  # noqa: F401  (item_seed: its former home)
from codiemb_pl.data.cache.entries import default_cache_dir
from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.collate import PaddingRule, TokenCollator, tokenize_texts
from codiemb_pl.data.eval_builders import build_eval_sets
from codiemb_pl.data.eval_sets import EvalSet, plan_eval_chunks
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE, instruction_prefix
from codiemb_pl.data.sampler import TaskBatchSampler
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.data.texts import read_texts
from codiemb_pl.data.token_budget import budget_batch_sizes
from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location


class ResumableDataLoader(DataLoader):
    """The training DataLoader: its batch sampler's position is its state (Lightning's `_Stateful`), and each
    new iterator plans the trainer's current epoch.

    Lightning calls `set_epoch` only on `loader.sampler` and `loader.batch_sampler.sampler`, never on a
    batch sampler, so `__iter__` sets the epoch itself from `current_epoch()`. Right after
    `load_state_dict` the restored (epoch, position) stands instead: a resumed run builds its iterator
    before Lightning restores its loop counters. Its workers fork with the rank's objects frozen (`objects_frozen`).
    """

    def __init__(self, *args: Any, current_epoch: Optional[Callable[[], int]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
        self.restored = True

    def __iter__(self):
        sampler = self.batch_sampler
        if self.restored:
            self.restored = False
            if sampler.consumed >= len(sampler):  # saved at the end of an epoch: the next one starts
                sampler.set_epoch(sampler.epoch + 1)
        elif self.current_epoch is not None:
            sampler.set_epoch(self.current_epoch())
        if self.num_workers > 0 and (self._iterator is None or not self.persistent_workers):  # workers start now
            with objects_frozen():
                return super().__iter__()
        return super().__iter__()


@contextlib.contextmanager
def objects_frozen() -> Iterator[None]:
    """`gc.freeze()` while DataLoader workers fork, `gc.unfreeze()` after: in each worker the objects inherited from
    the rank then sit in the collector's permanent generation, so the worker's collections never write to them
    (which would copy the pages they share with the rank, copy-on-write); the rank gets them back unchanged."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def restart_training_iterator(trainer: Optional["pl.Trainer"]) -> None:
    """Start the fit loop's training iterator again (Lightning started it when it built the loader), so
    that it plans from the loader's current state; the batch it prefetched is dropped, not consumed."""
    fetcher = getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
    if fetcher is not None:
        iter(fetcher)


class EvalTexts(Dataset):
    """This rank's chunks of evaluation sets (validation, test or predict); each item is a whole tokenised chunk."""

    def __init__(self, sets: list[EvalSet], chunks, tokenize, limits: dict[str, int]):
        self.sets, self.chunks, self.tokenize, self.limits = sets, chunks, tokenize, limits

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self.chunks[index]
        vset = self.sets[chunk.set_index]
        texts = [vset.texts[chunk.field][i] for i in chunk.rows]
        prefix = vset.prefixes.get(chunk.field, "")
        features = self.tokenize(texts, self.limits[chunk.field], [prefix] * len(texts) if prefix else None)
        return {"task": "encode", "set_index": chunk.set_index, "field": chunk.field,
                "rows": torch.tensor(chunk.rows, dtype=torch.long), "features": features}


class CoDiEmbDataModule(pl.LightningDataModule):
    """Training and validation data for CoDiEmb.

    The sampler's position (epoch, consumed micro-batches) travels with the training DataLoader, which
    Lightning saves in checkpoints and restores before iterating (`ResumableDataLoader`).

    Args:
        train: training sub-datasets (each a source with a task, an optional instruction and batch size).
        val: validation sets: STS pair files or BEIR folders (`task: ir`).
        tokenizer: tokenizer name or path (the CLI links it to the model's `model_name_or_path`).
        ir_batch_size: queries per device per micro-batch for IR sub-datasets without their own batch size.
        sts_batch_size: pairs per device per micro-batch for STS sub-datasets without their own batch size.
        ir_batch_tokens: a token budget per device per micro-batch for IR sub-datasets without their own batch size,
            instead of `ir_batch_size`: each gets max(1, budget // the tokens one of its records encodes: query,
            `n_positives` positives and `n_negatives` negatives at the 95th percentile of their cached lengths)
            (`token_budget.py`); 0 = off.
        sts_batch_tokens: the same for STS sub-datasets (both sentences of a pair), instead of `sts_batch_size`.
        policy: task ordering policy: proportional, balanced, temperature, round_robin, sequential, mixed (baseline:
            IR and STS items pooled in every micro-batch) or joint (baseline: one IR and one STS batch per step, their
            gradients combined by `model.gradient_combination`).
        temperature_alpha: exponent of the `temperature` policy (p_i ∝ n_i^alpha).
        n_positives: positives per query (P); shorter lists are re-sampled.
        n_negatives: hard negatives per query (N); 0 = in-batch negatives only.
        max_query_length: token limit of IR queries (instruction prefix included).
        max_passage_length: token limit of IR passages (positives and hard negatives).
        max_sts_length: token limit of each STS sentence (instruction prefix included).
        instruction_template: how a sub-dataset's `instruction` becomes a prefix of queries and STS sentences.
        passage_prefix: prefix for IR passages (default none).
        val_batch_size: texts per validation encoding batch.
        seed: seeds the sampler and the per-item choices (identical on every rank).
        num_workers: DataLoader workers.
        length_cap: no text group is tokenised past this many tokens (the CLI links it to the model's
            maximum sequence length).
        cache_dir: folder of the training-data cache (memory-mapped Arrow records and token ids, built once per
            source file and tokenizer, shared by every rank and worker); default `$HF_DATASETS_CACHE/codiemb`.
        rebuild_cache: rebuild this run's cache entries even when they are up to date.
        verify_cache: check the CRC-32 of every cache file this run opens (reads them whole: seconds per GB);
            by default only files whose size, footer, row count or modification time changed are rebuilt.
        test: test sets for `codiemb test` (same shape as `val`; scored like validation, logged as `test/...`).
        predict: file of texts for `codiemb predict`: `.txt` (one text per line) or jsonl/json/csv/tsv/parquet
            (the `predict_column` column); each text is encoded like a passage (`max_passage_length`).
        predict_column: the column of `predict` holding the texts.
        predict_instruction: encode the `predict` texts with this instruction's prefix (as training's queries).
    """

    def __init__(self, train: Optional[list[SourceConfig]] = None, val: Optional[list[SourceConfig]] = None,
                 tokenizer: Optional[str] = None, ir_batch_size: int = 32, sts_batch_size: int = 32,
                 policy: str = "proportional", temperature_alpha: float = 0.5, n_positives: int = 1,
                 n_negatives: int = 0, max_query_length: int = 64, max_passage_length: int = 256,
                 max_sts_length: int = 128, instruction_template: str = INSTRUCTION_TEMPLATE,
                 passage_prefix: str = "", val_batch_size: int = 128, seed: int = 42, num_workers: int = 0,
                 length_cap: Optional[int] = None, cache_dir: Optional[str] = None, rebuild_cache: bool = False,
                 verify_cache: bool = False, test: Optional[list[SourceConfig]] = None, predict: Optional[str] = None,
                 predict_column: str = "text", predict_instruction: Optional[str] = None, ir_batch_tokens: int = 0,
                 sts_batch_tokens: int = 0):
        super().__init__()
        self.save_hyperparameters()
        for option, value in (("data.ir_batch_tokens", ir_batch_tokens), ("data.sts_batch_tokens", sts_batch_tokens)):
            if value < 0:
                raise InputError(option, f"{value} is negative", "set a token budget per micro-batch, or 0 for the "
                                 "fixed batch size of data.ir_batch_size / data.sts_batch_size")
        self.train_sources = list(train or [])
        self.val_sources = list(val or [])
        self.tokenizer_name = tokenizer
        self.tokenizer = None
        self.padding: Optional[PaddingRule] = None  # how the tokenizer pads, read once
        self.length_cap = length_cap
        self.train_dataset: Optional[ArrowTrainingDataset] = None
        self.val_sets: list[EvalSet] = []
        self.test_sources = list(test or [])
        self.test_sets: list[EvalSet] = []
        self.predict_sets: list[EvalSet] = []  # the one set of `predict` texts (field "text")
        self.sampler: Optional[TaskBatchSampler] = None
        self.train_loader: Optional[ResumableDataLoader] = None  # built in this run (see load_state_dict)
        self.sampler_state_to_load: Optional[dict[str, Any]] = None  # from a checkpoint, see load_state_dict
        self.budget_sizes: Optional[list[Optional[int]]] = None  # per training source, from the token budgets
        self.carry_texts = False  # training batches carry their texts (`batch["texts"]`): set by a module whose
        #                           online teacher reads them (`CoDiEmbModule.setup`), before the loader is built

    # -- set-up ---------------------------------------------------------------------------------------
    def prefix_for(self, instruction: Optional[str]) -> str:
        return instruction_prefix(instruction, self.hparams.instruction_template)

    def load_tokenizer(self):
        if self.tokenizer is None:
            # pad token; decoders: left padding, EOS appended
            from codiemb_pl.model.decoder import load_backbone_tokenizer

            if not self.tokenizer_name:
                raise InputError("data.tokenizer", "no tokenizer given",
                                 "set data.tokenizer or model.model_name_or_path")
            self.tokenizer = load_backbone_tokenizer(resolve_location(self.tokenizer_name))
        return self.tokenizer

    def padding_rule(self) -> PaddingRule:
        """How the tokenizer pads (`collate.PaddingRule`), read once."""
        if self.padding is None:
            self.padding = PaddingRule.of(self.load_tokenizer())
        return self.padding

    def tokenize(self, texts: list[str], max_length: int, prefixes: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
        """`prefixes[i] + texts[i]` as token ids padded as training pads them (`collate.tokenize_texts`), at most
        `max_length` (and the model's `length_cap`) tokens each."""
        if self.length_cap:
            max_length = min(max_length, self.length_cap)
        return tokenize_texts(self.load_tokenizer(), texts, max_length, prefixes, self.padding_rule())

    def evaluation_sets(self, sources: list[SourceConfig], where: str) -> list[EvalSet]:
        """`data.val` / `data.test` sets with this module's instruction template and passage prefix."""
        return build_eval_sets(sources, where=where, instruction_template=self.hparams.instruction_template,
                                     passage_prefix=self.hparams.passage_prefix)

    def setup(self, stage: str) -> None:
        self.train_loader = None  # a loader of an earlier run must not take this run's restored position
        if stage == "fit" and self.train_dataset is None:
            if not self.train_sources:
                raise InputError("data.train", "no training sources configured", "add at least one entry under data.train")
            prefixes = [self.prefix_for(source.instruction) for source in self.train_sources]
            self.train_dataset = ArrowTrainingDataset(self.train_sources, prefixes, self.hparams.seed,
                                                      self.training_cache_dir(), rebuild=self.hparams.rebuild_cache,
                                                      verify=self.hparams.verify_cache)
        if stage in ("fit", "validate") and not self.val_sets:
            self.val_sets = self.evaluation_sets(self.val_sources, "data.val")
        if stage == "test" and not self.test_sets:
            if not self.test_sources:
                raise InputError("data.test", "no test sets configured",
                                 "add entries under data.test, shaped like those of data.val")
            self.test_sets = self.evaluation_sets(self.test_sources, "data.test")
        if stage == "predict" and not self.predict_sets:
            if not self.hparams.predict:
                raise InputError("data.predict", "no file of texts to embed", "pass --data.predict FILE")
            texts = read_texts(self.hparams.predict, self.hparams.predict_column)
            self.predict_sets = [EvalSet(name="predict", task="predict", texts={"text": texts},
                                               prefixes={"text": self.prefix_for(self.hparams.predict_instruction)})]

    def training_cache_dir(self) -> Path:
        return Path(resolve_location(self.hparams.cache_dir)) if self.hparams.cache_dir else default_cache_dir()

    def check_training_plan(self, world_size: int, accumulate: int) -> TaskBatchSampler:
        """Load and validate every source and build the sampler once, so bad input stops the run early."""
        self.setup("fit")
        return self.build_sampler(world_size, 0, accumulate)

    def batch_size_of(self, source: SourceConfig) -> int:
        """The source's per-device batch size: its own `batch_size`, else its task's token budget's, else its task's
        `ir_batch_size` / `sts_batch_size`."""
        if source.batch_size:
            return int(source.batch_size)
        if self.hparams.ir_batch_tokens if source.task == "ir" else self.hparams.sts_batch_tokens:
            return self.token_budget_sizes()[self.train_sources.index(source)]
        return self.hparams.ir_batch_size if source.task == "ir" else self.hparams.sts_batch_size

    def token_budget_sizes(self) -> list[Optional[int]]:
        """Per training source, its batch size from its task's token budget (None: no budget, or its own
        `batch_size`, which wins), computed once from the token cache (`token_budget.py`), one line per source."""
        if self.budget_sizes is None:
            if self.train_dataset is None:
                self.setup("fit")
            dataset = self.train_dataset
            if dataset.tokens is None:
                dataset.tokenize(self.load_tokenizer(), self.token_limits())
            budgets = {"ir": self.hparams.ir_batch_tokens, "sts": self.hparams.sts_batch_tokens}
            self.budget_sizes, lines, warnings = budget_batch_sizes(
                self.train_sources, [tokens.column for tokens in dataset.tokens], budgets, self.hparams.n_positives,
                self.hparams.n_negatives)
            for line in lines:
                rank_zero_info(line)
            for line in warnings:
                rank_zero_warn(line)
        return self.budget_sizes

    # -- loaders --------------------------------------------------------------------------------------
    def build_sampler(self, world_size: int, rank: int, accumulate: int) -> TaskBatchSampler:
        assert self.train_dataset is not None
        return TaskBatchSampler(
            sizes=self.train_dataset.sizes,
            tasks=[s.task for s in self.train_sources],
            batch_sizes=[self.batch_size_of(s) for s in self.train_sources],
            world_size=world_size, rank=rank, accumulate=accumulate, policy=self.hparams.policy,
            seed=self.hparams.seed, temperature_alpha=self.hparams.temperature_alpha,
            names=[s.name for s in self.train_sources])

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        rank = trainer.global_rank if trainer else 0
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        self.sampler = self.build_sampler(world_size, rank, accumulate)
        tokenizer = self.load_tokenizer()
        self.train_dataset.tokenize(tokenizer, self.token_limits())  # once per cache entry; later runs open it
        self.train_dataset.with_texts = self.carry_texts
        collator = TokenCollator(self.padding_rule(), n_positives=self.hparams.n_positives,
                                 n_negatives=self.hparams.n_negatives,
                                 two_task="joint" if self.hparams.policy == "joint" else "mixed")
        # its own generator: starting an epoch's iterator must not draw from the global RNG (dropout), or a
        # resumed run's RNG stream would drift from the uninterrupted run's at the next epoch boundary
        generator = torch.Generator().manual_seed(self.hparams.seed + rank)
        loader = ResumableDataLoader(self.train_dataset, batch_sampler=self.sampler, collate_fn=collator,
                                     num_workers=self.hparams.num_workers, generator=generator,
                                     persistent_workers=self.hparams.num_workers > 0,
                                     current_epoch=(lambda: trainer.current_epoch) if trainer else None)
        if self.sampler_state_to_load is not None:
            loader.load_state_dict(self.sampler_state_to_load)
            self.sampler_state_to_load = None
        self.train_loader = loader
        return loader

    def token_limits(self) -> TokenLimits:
        """The configured maximum lengths, capped by the model's (`length_cap`)."""
        def capped(limit: int) -> int:
            return min(limit, self.length_cap) if self.length_cap else limit
        return TokenLimits(capped(self.hparams.max_query_length), capped(self.hparams.max_passage_length),
                           capped(self.hparams.max_sts_length))

    def val_dataloader(self) -> DataLoader | list:
        return self.encoding_dataloader(self.val_sets)

    def test_dataloader(self) -> DataLoader | list:
        return self.encoding_dataloader(self.test_sets)

    def predict_dataloader(self) -> DataLoader | list:
        return self.encoding_dataloader(self.predict_sets)

    def encoding_dataloader(self, sets: list[EvalSet]) -> DataLoader | list:
        """This rank's length-sorted chunks of every text of `sets` (validation, test or predict)."""
        if not sets:
            return []
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        rank = trainer.global_rank if trainer else 0
        chunks = plan_eval_chunks(sets, self.hparams.val_batch_size, world_size, rank)
        limits = {"text1": self.hparams.max_sts_length, "text2": self.hparams.max_sts_length,
                  "query": self.hparams.max_query_length, "corpus": self.hparams.max_passage_length,
                  "text": self.hparams.max_passage_length}
        dataset = EvalTexts(sets, chunks, self.tokenize, limits)
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.hparams.num_workers)

    # -- resume bookkeeping ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sampler position, saved in checkpoints (restored by `load_state_dict` on `--ckpt_path`)."""
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the saved sampler position for `train_dataloader`.

        Lightning restores the datamodule before `configure_optimizers` builds the training loader (via
        `estimated_stepping_batches`) but its loop state only afterwards, too late for that loader's first
        iterator; restoring here lets a resumed run continue at the exact micro-batch.

        Strategies that restore a checkpoint only after their set-up (`restore_checkpoint_after_setup`:
        FSDP2 / `ModelParallelStrategy`, FSDP, DeepSpeed) call this after that loader was built and its first
        iterator started (which already planned the epoch from micro-batch 0): the position then goes to
        that loader and the trainer's training iterator is restarted from it.
        """
        sampler_state = state.get("sampler")
        if sampler_state is not None and self.train_loader is not None:
            self.train_loader.load_state_dict(sampler_state)
            restart_training_iterator(self.trainer)
        else:
            self.sampler_state_to_load = sampler_state

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training micro-batch as consumed when it is handed to the step (not when prefetched)."""
        if self.trainer is not None and self.trainer.training and self.sampler is not None:
            self.sampler.mark_consumed()
        return batch
