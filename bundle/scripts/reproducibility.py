"""Every random draw of a training epoch as a function of the run's seed and the epoch's number.

A run resumed after epoch k must go on exactly as the uninterrupted run would. Restoring weights, optimizer,
scheduler and epoch counter is not enough: the order of the batches, the DataLoader workers' seeds (from which
MONAI's ``worker_init_fn`` seeds each worker's random transforms), the rotation angles drawn in the main
process when there are no workers, and dropout all come from random generators whose state the checkpoint
does not hold. Rather than save and restore each of them, :class:`EpochSeedHandler` re-seeds them all at the
start of every epoch from ``(seed, epoch)``, as ``DistributedSampler.set_epoch`` does for its shuffle: the
epoch's draws then depend on nothing that happened before it. (The groups of an epoch are already drawn from
``(seed, epoch)`` by ``scripts.pairs.GroupDataset``.)

Ignite creates an epoch's DataLoader iterator after ``EPOCH_STARTED``, and that is where the sampler's order
and the workers' seeds are drawn, so seeding at ``EPOCH_STARTED`` covers them. What still changes results
between machines is arithmetic, not randomness: the number of threads and the CPU's instruction set change
the order of floating-point sums (see the README).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd

__all__ = ["EpochSeedHandler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for ``epoch`` of a run seeded with ``seed``, independent of the pair draw's stream."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 1]).generate_state(1)[0])


class EpochSeedHandler:
    """Ignite handler: on ``EPOCH_STARTED``, seed Python's, NumPy's and torch's generators (CPU and every CUDA
    device) and the random transforms of ``dataset`` in this process from :func:`epoch_seed`.

    Args:
        seed: the run's seed (``--seed``).
        dataset: the training dataset, whose random transforms (MONAI ``Randomizable``) run in the main process
            when the DataLoader has no workers; with workers, each worker re-seeds its copy from the seed the
            DataLoader draws, which this handler has fixed.
    """

    def __init__(self, seed: int, dataset: Any = None) -> None:
        self.seed = int(seed)
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = epoch_seed(self.seed, engine.state.epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.dataset is not None:
            set_rnd(self.dataset, seed)
