"""Endless, resumable micro-batches: a seeded permutation per epoch cut into global batches, of which each rank
takes its slice; the position (epoch, batch) is checkpointed so a resumed run sees the same data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import CarryErrors, collate_carrying, raise_carried
from ..errors import ConfigError
from .config import TrainConfig
from .context import RunContext
from ..data.buckets import BucketBatches
from .seeding import DATA_ORDER, LOADER, derive_seed


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's items, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER, epoch)))


class EpochBatches:
    """Batch sampler for one epoch: a seeded permutation cut into global micro-batches (drop_last), of which this
    rank takes its slice, starting at micro-batch ``start`` (the resume position)."""

    def __init__(self, n: int, micro_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                 start: int = 0) -> None:
        self.global_batch = micro_batch * world_size
        self.count = n // self.global_batch
        self.micro_batch, self.rank, self.start = micro_batch, rank, start
        self.perm = epoch_permutation(n, seed, epoch)

    def __len__(self) -> int:
        return max(0, self.count - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.count):
            lo = b * self.global_batch + self.rank * self.micro_batch
            yield self.perm[lo:lo + self.micro_batch].tolist()


@dataclass
class DataPosition:
    """Where the loader stands: epoch and the next micro-batch within it."""

    epoch: int = 0
    batch: int = 0


class DataStream:
    """Endless micro-batches over epochs, resumable from a ``DataPosition``."""

    def __init__(self, dataset: Dataset, cfg: TrainConfig, ctx: RunContext, micro_batch: int,
                 position: DataPosition, data_rank: int | None = None, data_world: int | None = None,
                 bucket_batches: list[int] | None = None) -> None:
        """``data_rank``/``data_world``: which share of each global batch this rank reads (default the context's
        rank and world; with context parallelism the ranks of a group read the same share). ``bucket_batches``:
        the micro-batch of each size bucket of a bucketed dataset (its ``bucket_of``), batches of one shape each."""
        self.dataset, self.cfg, self.ctx, self.micro_batch = dataset, cfg, ctx, micro_batch
        self.bucket_batches = bucket_batches
        self.rank = ctx.rank if data_rank is None else data_rank
        self.world = ctx.world_size if data_world is None else data_world
        self.collate = collate_carrying  # with CarryErrors: worker errors arrive as raised
        self.pos = position
        n = len(dataset)  # type: ignore[arg-type]
        if n < micro_batch * self.world:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the dataset ({n} items)")
        self._it: Iterator[dict[str, Any]] | None = None

    def _open(self) -> None:
        sampler: EpochBatches | BucketBatches
        if self.bucket_batches is not None:
            perm = epoch_permutation(len(self.dataset), self.cfg.seed, self.pos.epoch)  # type: ignore[arg-type]
            sampler = BucketBatches(self.dataset.bucket_of, self.bucket_batches, self.rank,  # type: ignore[attr-defined]
                                    self.world, perm, self.pos.batch)
        else:
            sampler = EpochBatches(len(self.dataset), self.micro_batch, self.rank,  # type: ignore[arg-type]
                                   self.world, self.cfg.seed, self.pos.epoch, self.pos.batch)
        loader = DataLoader(CarryErrors(self.dataset), batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=self.cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, LOADER, self.pos.epoch)),
                            pin_memory=self.ctx.device.type == "cuda")
        self._it = iter(self.ctx.prepare_loader(loader))

    def next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._open()
            try:
                batch = raise_carried(next(self._it))  # type: ignore[arg-type]
            except StopIteration:
                self._it = None
                self.pos = DataPosition(self.pos.epoch + 1, 0)
                continue
            self.pos = DataPosition(self.pos.epoch, self.pos.batch + 1)
            return batch
