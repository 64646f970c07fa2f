"""Image pairs for Synergic Deep Learning (SDL).

Each SDL training sample is a pair of slices: branch A classifies the first, branch B the second, and the
synergic head predicts whether both have the same grade (``synergic_label`` 1.0) or not (0.0).

Two pairings:

* ``"balanced"`` (default): :func:`draw_balanced_pairs` re-draws pairs every epoch (``set_epoch``, driven by
  :class:`PairRedrawHandler`), with a controlled share of same-grade pairs and each image used about once.
* ``"paper"``: :func:`paper_fixed_pairs`, the original paper's pairing, drawn once and never changed.

Evaluation needs no pairs: it uses the MONAI dataset of single items (``CacheDataset``/``Dataset`` over the
records with ``preprocessing_transforms``) and one branch's prediction per slice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset

__all__ = ["PAIRINGS", "PairDataset", "PairRedrawHandler", "draw_balanced_pairs", "paper_fixed_pairs"]

PAIRINGS = ("balanced", "paper")
Pair = tuple[int, int]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class _ClassQueues:
    """Per-class queues of shuffled image indices, refilled with a fresh permutation when empty.

    Drawing from the fullest queue keeps the use count of every image within one of the others, which is
    what "each image about once per epoch" means when the epoch length is fixed.
    """

    def __init__(self, labels: Sequence[int], rng: np.random.Generator) -> None:
        self.rng = rng
        self.members: dict[int, np.ndarray] = {
            c: np.flatnonzero(np.asarray(labels) == c) for c in sorted({int(v) for v in labels})
        }
        self.queues: dict[int, deque[int]] = {c: deque() for c in self.members}
        for c in self.members:
            self._refill(c)

    def _refill(self, c: int, avoid: int | None = None) -> None:
        order = [int(i) for i in self.rng.permutation(self.members[c])]
        if avoid is not None and len(order) > 1 and order[0] == avoid:
            order.append(order.pop(0))  # never pair an image with itself across a refill
        self.queues[c].extend(order)

    def pop(self, c: int, avoid: int | None = None) -> int:
        if not self.queues[c]:
            self._refill(c, avoid)
        return self.queues[c].popleft()

    def fullest(self, candidates: Sequence[int]) -> int:
        """The candidate class with most images left; random tie-break (jitter < 1 image)."""
        scores = [len(self.queues[c]) + 0.5 * self.rng.random() for c in candidates]
        return candidates[int(np.argmax(scores))]


def draw_balanced_pairs(
    labels: Sequence[int],
    *,
    same_fraction: float = 0.5,
    num_pairs: int | None = None,
    rng: np.random.Generator | int | None,
) -> list[Pair]:
    """Draw ``num_pairs`` index pairs, ``round(same_fraction * num_pairs)`` (half up) of them same-label.

    ``num_pairs`` defaults to ``len(labels) // 2``: an epoch then holds about half as many pairs as images
    and each image appears about once. Classes are drawn from per-class shuffled queues (fullest first), so
    rare classes are re-used only once they run out. A class with a single image can only be in
    different-label pairs. The order inside a different-label pair is random, so both branches see all grades.
    """
    rng = _as_rng(rng)
    labels = [int(v) for v in labels]
    if not 0.0 <= same_fraction <= 1.0:
        raise ValueError(f"same_fraction must be in [0, 1], got {same_fraction}")
    num_pairs = len(labels) // 2 if num_pairs is None else int(num_pairs)
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    n_same = int(np.floor(same_fraction * num_pairs + 0.5))
    n_diff = num_pairs - n_same
    queues = _ClassQueues(labels, rng)
    classes = list(queues.members)
    pairable = [c for c in classes if len(queues.members[c]) >= 2]
    if n_diff > 0 and len(classes) < 2:
        raise ValueError(
            f"different-grade pairs need at least 2 classes, found {classes} (use same_fraction=1.0 or more grades)"
        )
    if n_same > 0 and not pairable:
        raise ValueError("same-grade pairs need a class with at least 2 images; every class has a single image")

    kinds = np.array([True] * n_same + [False] * n_diff)
    rng.shuffle(kinds)
    pairs: list[Pair] = []
    for same in kinds:
        if same:
            c = queues.fullest(pairable)
            a = queues.pop(c)
            b = queues.pop(c, avoid=a)
            if a == b:  # queue held only `a` after a refill; take the next one
                b = queues.pop(c, avoid=a)
        else:
            c1 = queues.fullest(classes)
            c2 = queues.fullest([c for c in classes if c != c1])
            a, b = queues.pop(c1), queues.pop(c2)
            if rng.random() < 0.5:
                a, b = b, a
        pairs.append((a, b))
    return pairs


def paper_fixed_pairs(labels: Sequence[int], *, rng: np.random.Generator | int | None) -> list[Pair]:
    """The paper's fixed pairing, drawn once.

    Within each grade (shuffled), the first half of the images is paired consecutively inside the grade
    (synergic label 1); each image of the second half is paired with a random image of another grade
    (label 0). Leftovers (an odd image in the first half, or all of the second half when only one grade
    exists) are dropped. About a third of the pairs are therefore same-grade pairs.
    """
    rng = _as_rng(rng)
    labels_arr = np.asarray([int(v) for v in labels])
    pairs: list[Pair] = []
    for c in sorted(set(labels_arr.tolist())):
        members = rng.permutation(np.flatnonzero(labels_arr == c))
        half = len(members) // 2
        first, rest = members[:half], members[half:]
        pairs += [(int(first[i]), int(first[i + 1])) for i in range(0, len(first) - 1, 2)]
        others = np.flatnonzero(labels_arr != c)
        if len(others):
            pairs += [(int(a), int(rng.choice(others))) for a in rest]
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of SDL pairs over a MONAI dataset of single items.

    Args:
        base_dataset: items are dicts with an ``image`` tensor (e.g. ``CacheDataset`` with
            ``training_transforms``) and optionally ``patient_id``.
        labels: grade label of each base item, read from the records (never by loading images).
        same_fraction: share of same-grade pairs for ``"balanced"`` pairing.
        pairing: ``"balanced"`` (re-drawn each epoch) or ``"paper"`` (fixed).
        seed: pairs are a pure function of ``seed`` and the epoch, so every DDP rank draws the same pairs
            and a resumed run continues with the pairs it would have drawn.
        num_pairs: pairs per epoch for ``"balanced"`` (default ``len(labels) // 2``), constant across epochs
            so the DataLoader length never changes.

    The current epoch lives in a shared-memory tensor and pairs are re-drawn lazily from it, so DataLoader
    workers (also ``persistent_workers=True``) follow ``set_epoch`` made in the main process.
    """

    def __init__(
        self,
        base_dataset: Any,
        labels: Sequence[int],
        *,
        same_fraction: float = 0.5,
        pairing: str = "balanced",
        seed: int = 0,
        num_pairs: int | None = None,
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}; choose one of {PAIRINGS}")
        if len(labels) != len(base_dataset):
            raise ValueError(f"{len(labels)} labels for a dataset of {len(base_dataset)} items")
        self.base_dataset = base_dataset
        self.labels = [int(v) for v in labels]
        self.same_fraction = same_fraction
        self.pairing = pairing
        self.seed = seed
        self.num_pairs = num_pairs
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._pairs_epoch: int | None = None
        self._pairs: list[Pair] = []
        if pairing == "paper":
            self._pairs = paper_fixed_pairs(self.labels, rng=np.random.default_rng(seed))
        self._refresh()

    @classmethod
    def from_records(
        cls,
        records: Sequence[dict],
        transform: Any,
        *,
        cache: bool = True,
        same_fraction: float = 0.5,
        pairing: str = "balanced",
        seed: int = 0,
        cache_num_workers: int = 0,
        cache_rate: float = 1.0,
        num_pairs: int | None = None,
    ) -> PairDataset:
        """Build the base MONAI dataset (``CacheDataset`` or plain ``Dataset``) and the pair dataset on top.

        ``CacheDataset`` caches the deterministic head of ``transform`` (everything before the first random
        transform) for ``cache_rate`` of the records; labels come from the records, not from the images.
        """
        records = list(records)
        if cache and cache_rate > 0:
            base = CacheDataset(
                records, transform=transform, cache_rate=cache_rate, num_workers=cache_num_workers, progress=False
            )
        else:
            base = MonaiDataset(records, transform=transform)
        labels = [int(r["label"]) for r in records]
        return cls(base, labels, same_fraction=same_fraction, pairing=pairing, seed=seed, num_pairs=num_pairs)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Re-draw balanced pairs for ``epoch`` (deterministic in ``seed`` and ``epoch``); no-op for ``paper``."""
        self._epoch.fill_(int(epoch))
        self._refresh()

    def _refresh(self) -> None:
        epoch = self.epoch
        if self.pairing == "paper" or self._pairs_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self._pairs = draw_balanced_pairs(
            self.labels, same_fraction=self.same_fraction, num_pairs=self.num_pairs, rng=rng
        )
        self._pairs_epoch = epoch

    @property
    def pairs(self) -> list[Pair]:
        """Index pairs (into ``base_dataset``) of the current epoch."""
        self._refresh()
        return list(self._pairs)

    def __len__(self) -> int:
        self._refresh()
        return len(self._pairs)

    def _item(self, index: int) -> tuple[torch.Tensor, str]:
        item = self.base_dataset[index]
        image = item["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return image, str(item.get("patient_id", ""))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        self._refresh()
        a, b = self._pairs[i]
        image_a, patient_a = self._item(a)
        image_b, patient_b = self._item(b)
        label_a, label_b = self.labels[a], self.labels[b]
        return {
            "image_a": image_a,
            "label_a": torch.tensor(label_a, dtype=torch.long),
            "image_b": image_b,
            "label_b": torch.tensor(label_b, dtype=torch.long),
            "synergic_label": torch.tensor(float(label_a == label_b), dtype=torch.float32),
            "patient_id_a": patient_a,
            "patient_id_b": patient_b,
        }


class PairRedrawHandler:
    """Ignite handler: ``dataset.set_epoch(engine.state.epoch)`` on every ``EPOCH_STARTED``.

    Ignite creates the epoch's DataLoader iterator after ``EPOCH_STARTED``, so the new pairs are used from
    the epoch's first batch; after a resume ``state.epoch`` is restored first, so the pairs match an
    uninterrupted run. ``num_pairs`` is constant, so the DataLoader length does not change.
    """

    def __init__(self, dataset: PairDataset) -> None:
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch)
