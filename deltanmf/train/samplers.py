"""Which cells each training step sees: epochs drawn from the seed alone, resumable mid-epoch,
shared out between DDP processes.

Lightning's own distributed sampler is not used (the trainer is built with
``use_distributed_sampler=False``): it hands out whole batches and pads the list by
repeating some, so a few cells would be trained twice per epoch; :class:`RankShare` cuts
every batch between the processes instead.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from torch.utils.data import Sampler

from ..errors import InputError


class EpochBatches(Sampler):
    """Minibatches of cells for one epoch at a time, drawn from ``(seed, epoch)`` alone.

    Parameters
    ----------
    n_cells, batch_size
        Cells, and cells per batch (the last batch may be smaller).
    seed
        Seed of the batch order.
    draw
        ``draw(batch_size, rng) -> list of index arrays`` making one epoch's batches from
        a numpy Generator; ``None`` shuffles the cells uniformly. (Cells on disk use
        :meth:`~deltanmf.data.backed.H5adRows.batch_indices`: batches of a few runs of
        consecutive cells, quick to read.)

    :class:`ResumableBatches` sets the epoch before each pass. Since an epoch's order does
    not depend on the epochs before it, an interrupted fit resumed at epoch ``e`` sees the
    batches the uninterrupted fit saw.
    """

    def __init__(self, n_cells: int, batch_size: int, seed: int = 0,
                 draw: Callable[[int, np.random.Generator], list] | None = None):
        self.n_cells, self.batch_size, self.seed = int(n_cells), int(batch_size), int(seed)
        self.draw, self.epoch = draw, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])  # SeedSequence takes no negative seed
        if self.draw is not None:
            yield from self.draw(self.batch_size, rng)
            return
        order = rng.permutation(self.n_cells)
        for start in range(0, self.n_cells, self.batch_size):
            yield order[start:start + self.batch_size]


class ResumableBatches(Sampler):
    """The batches of an epoch-keyed sampler (``set_epoch``), from where training stands.

    ``position() -> (epoch, done)`` is asked when the epoch's first batch is wanted:
    the sampler is set to ``epoch`` and its first ``done`` batches are skipped. ``done``
    is 0 except when a fit resumes from a checkpoint taken in the middle of an epoch,
    where it is the number of that epoch's batches already trained. Without
    ``position``, each pass is the next epoch.
    """

    def __init__(self, sampler, position: Callable[[], tuple[int, int]] | None = None):
        self.sampler, self.position = sampler, position
        self._passes = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # a generator: the position is read when the first batch is drawn, after Lightning
        # has restored its loop state (in-process loading: also after its loop reset)
        if self.position is None:
            epoch, done = self._passes, 0
            self._passes += 1
        else:
            epoch, done = self.position()
            if done >= len(self.sampler):
                # read before Lightning's loop reset (DataLoader workers draw indices as soon as
                # the iterator exists): a checkpoint after an epoch's last batch resumes the next epoch
                epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        yield from itertools.islice(iter(self.sampler), done, None)


class RankShare(Sampler):
    """One process's share of every minibatch under DDP: part ``rank`` of each batch of
    ``batches`` cut into ``world_size`` near-equal parts.

    Every process draws the same batches (same seed), so each epoch every cell is trained
    exactly once, by one process, and all processes take the same number of steps (DDP
    averages their gradients at every step). A last batch with fewer cells than processes
    joins the batch before it, so no process ever gets an empty batch. (Lightning's own
    distributed sampler hands out whole batches instead, padding the list by repeating
    some, so a few cells were trained twice per epoch.)
    """

    def __init__(self, batches, n_cells: int, batch_size: int, rank: int, world_size: int):
        if batch_size < world_size:
            raise InputError(f"data.batch_size={batch_size} is smaller than the {world_size} processes; each "
                             f"process needs cells of every batch: use data.batch_size >= {world_size}")
        self.batches, self.rank, self.world_size = batches, int(rank), int(world_size)
        self.n_cells, self.batch_size = int(n_cells), int(batch_size)

    def _merges_last(self) -> bool:
        tail = self.n_cells % self.batch_size
        return self.n_cells > self.batch_size and 0 < tail < self.world_size

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size) - self._merges_last()

    def __iter__(self):
        batches = iter(self.batches)
        previous = next(batches, None)
        for batch in batches:
            if len(batch) < self.world_size:  # the short last batch: served with the one before
                previous = np.concatenate([np.asarray(previous), np.asarray(batch)])
                continue
            yield self._share(previous)
            previous = batch
        if previous is not None:
            yield self._share(previous)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def _share(self, batch) -> np.ndarray:
        return np.array_split(np.asarray(batch, dtype=np.int64), self.world_size)[self.rank]
