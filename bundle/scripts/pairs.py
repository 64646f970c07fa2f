"""Image groups for Synergic Deep Learning (SDL^n): pairs for two branches, N-tuples for N.

Each SDL training sample is a group of slices, one per branch: branch i classifies the group's i-th slice, and
the synergic head of branches (i, j) predicts whether slices i and j have the same grade.

Two pairings:

* ``"balanced"`` (default): :func:`draw_balanced_groups` re-draws the groups every epoch (``set_epoch``, driven
  by :class:`GroupRedrawHandler`) so that every synergic head sees a controlled share of same-grade pairs and
  each image is used about once per branch.
* ``"paper"``: :func:`paper_fixed_pairs`, the original paper's pairing (two branches), drawn once and never
  changed.

Evaluation needs no groups: it uses the MONAI dataset of single items (``CacheDataset``/``Dataset`` over the
records with ``preprocessing_transforms``) and the branches' mean prediction per slice.
"""

from __future__ import annotations

import string
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset

__all__ = ["PAIRINGS", "GroupDataset", "GroupRedrawHandler", "draw_balanced_groups", "paper_fixed_pairs"]

PAIRINGS = ("balanced", "paper")
Group = tuple[int, ...]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class _ClassQueues:
    """Per-class queues of shuffled image indices, refilled with a fresh permutation when empty.

    Drawing from the fullest queue keeps the use count of every image within one of the others, which is
    what "each image about once per epoch" means when the epoch length is fixed. Each branch position has its
    own queues, so every image comes round once per branch.
    """

    def __init__(self, members: dict[int, np.ndarray], rng: np.random.Generator) -> None:
        self.rng = rng
        self.members = members
        self.queues: dict[int, deque[int]] = {c: deque() for c in members}
        for c in members:
            self._refill(c)

    def _refill(self, c: int) -> None:
        self.queues[c].extend(int(i) for i in self.rng.permutation(self.members[c]))

    def left(self, c: int) -> int:
        return len(self.queues[c])

    def pop(self, c: int, avoid: set[int]) -> int:
        """The next image of class ``c`` that is not in ``avoid`` (the group's images so far)."""
        if not self.queues[c]:
            self._refill(c)
        queue = self.queues[c]
        for k, index in enumerate(queue):
            if index not in avoid:
                del queue[k]
                return index
        self._refill(c)  # every queued image is already in the group: take one from a fresh round
        return self.pop(c, avoid)


def _spread_same_share(group_size: int, n_classes: int) -> float:
    """Share of same-grade pairs among a group's positions when its grades are spread as evenly as possible."""
    counts = [group_size // n_classes + (k < group_size % n_classes) for k in range(n_classes)]
    return sum(c * (c - 1) for c in counts) / (group_size * (group_size - 1))


def draw_balanced_groups(
    labels: Sequence[int],
    *,
    group_size: int = 2,
    same_fraction: float = 0.5,
    num_groups: int | None = None,
    rng: np.random.Generator | int | None,
) -> list[Group]:
    """Draw ``num_groups`` groups of ``group_size`` distinct image indices, one per branch.

    Every group is either *uniform* (all one grade) or *spread* (grades as different as the number of classes
    allows: all different when ``group_size`` <= the number of classes). Every pair of positions, i.e. every
    synergic head, is then a same-grade pair exactly in the uniform groups (when all can differ), so drawing
    ``round(same_fraction * num_groups)`` uniform groups (half up) gives each head exactly that share of
    same-grade pairs. With more branches than classes a spread group must repeat a grade; the share of uniform
    groups is then lowered so that each head's share is ``same_fraction`` in expectation over the random
    assignment of grades to positions (a lower share is impossible and refused).

    ``num_groups`` defaults to ``len(labels)``: each branch position has its own per-class queues, so every
    image is used about once per branch and epoch. Classes are drawn from the fullest queues, so rare classes
    are re-used only once they run out; a class with fewer images than ``group_size`` is never uniform.
    """
    rng = _as_rng(rng)
    labels = [int(v) for v in labels]
    if group_size < 2:
        raise ValueError(f"a synergic group needs at least 2 branches, got group_size={group_size}")
    if not 0.0 <= same_fraction <= 1.0:
        raise ValueError(f"same_fraction must be in [0, 1], got {same_fraction}")
    num_groups = len(labels) if num_groups is None else int(num_groups)
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    members = {c: np.flatnonzero(np.asarray(labels) == c) for c in sorted(set(labels))}
    classes = list(members)
    uniform_classes = [c for c in classes if len(members[c]) >= group_size]
    floor = _spread_same_share(group_size, len(classes)) if classes else 1.0
    if same_fraction < 1.0 and len(classes) < 2:
        raise ValueError(
            f"different-grade pairs need at least 2 classes, found {classes} (use same_fraction=1.0 or more grades)"
        )
    if same_fraction < floor - 1e-9:
        raise ValueError(
            f"with {group_size} branches and {len(classes)} classes some heads always see a same-grade pair: "
            f"same_fraction must be at least {floor:.3f}"
        )
    uniform_share = 1.0 if floor >= 1.0 else (same_fraction - floor) / (1.0 - floor)
    n_uniform = int(np.floor(uniform_share * num_groups + 0.5))
    if n_uniform > 0 and not uniform_classes:
        raise ValueError(f"same-grade groups need a class with at least {group_size} images; none has")

    queues = [_ClassQueues(members, rng) for _ in range(group_size)]
    kinds = np.array([True] * n_uniform + [False] * (num_groups - n_uniform))
    rng.shuffle(kinds)
    groups: list[Group] = []
    for uniform in kinds:
        if uniform:
            scores = [sum(q.left(c) for q in queues) + 0.5 * rng.random() for c in uniform_classes]
            grades = [uniform_classes[int(np.argmax(scores))]] * group_size
        else:
            grades = _spread_grades(queues, classes, rng)
        chosen: list[int] = []
        for queue, grade in zip(queues, grades, strict=True):
            chosen.append(queue.pop(grade, set(chosen)))
        groups.append(tuple(chosen))
    return groups


def _spread_grades(queues: list[_ClassQueues], classes: list[int], rng: np.random.Generator) -> list[int]:
    """Grades for a spread group: positions in random order each take the fullest class (in its own queues)
    among those used least so far in the group, so grades repeat only when there are more positions than
    classes."""
    grades: list[int | None] = [None] * len(queues)
    used = dict.fromkeys(classes, 0)
    for position in rng.permutation(len(queues)):
        least = min(used.values())
        candidates = [c for c in classes if used[c] == least]
        scores = [queues[position].left(c) + 0.5 * rng.random() for c in candidates]
        grade = candidates[int(np.argmax(scores))]
        grades[position] = grade
        used[grade] += 1
    return [int(g) for g in grades]


def paper_fixed_pairs(labels: Sequence[int], *, rng: np.random.Generator | int | None) -> list[Group]:
    """The paper's fixed pairing, drawn once.

    Within each grade (shuffled), the first half of the images is paired consecutively inside the grade
    (synergic label 1); each image of the second half is paired with a random image of another grade
    (label 0). Leftovers (an odd image in the first half, or all of the second half when only one grade
    exists) are dropped. About a third of the pairs are therefore same-grade pairs.
    """
    rng = _as_rng(rng)
    labels_arr = np.asarray([int(v) for v in labels])
    pairs: list[Group] = []
    for c in sorted(set(labels_arr.tolist())):
        members = rng.permutation(np.flatnonzero(labels_arr == c))
        half = len(members) // 2
        first, rest = members[:half], members[half:]
        pairs += [(int(first[i]), int(first[i + 1])) for i in range(0, len(first) - 1, 2)]
        others = np.flatnonzero(labels_arr != c)
        if len(others):
            pairs += [(int(a), int(rng.choice(others))) for a in rest]
    return pairs


class GroupDataset(torch.utils.data.Dataset):
    """Map-style dataset of SDL groups (pairs for two branches) over a MONAI dataset of single items.

    Args:
        base_dataset: items are dicts with an ``image`` tensor (e.g. ``CacheDataset`` with
            ``training_transforms``).
        labels: grade label of each base item, read from the records (never by loading images).
        group_size: images per group, one per branch (``num_branches``).
        same_fraction: share of same-grade pairs every synergic head sees, for ``"balanced"`` pairing.
        pairing: ``"balanced"`` (re-drawn each epoch) or ``"paper"`` (fixed pairs; two branches only).
        seed: groups are a pure function of ``seed`` and the epoch, so every DDP rank draws the same groups
            and a resumed run continues with the groups it would have drawn.
        num_groups: groups per epoch for ``"balanced"`` (default ``len(labels)``: each image about once per
            branch), constant across epochs so the DataLoader length never changes.

    An item holds ``image_a``, ``label_a``, ``image_b``, ``label_b``, ... (letters as the trainer's
    :func:`scripts.trainer.branch_letters`). The current epoch lives in a shared-memory tensor and groups are
    re-drawn lazily from it, so DataLoader workers (also ``persistent_workers=True``) follow ``set_epoch``
    made in the main process.
    """

    def __init__(
        self,
        base_dataset: Any,
        labels: Sequence[int],
        *,
        group_size: int = 2,
        same_fraction: float = 0.5,
        pairing: str = "balanced",
        seed: int = 0,
        num_groups: int | None = None,
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}; choose one of {PAIRINGS}")
        if pairing == "paper" and int(group_size) != 2:
            raise ValueError(f"the paper's fixed pairing is for two branches, not {group_size}")
        if len(labels) != len(base_dataset):
            raise ValueError(f"{len(labels)} labels for a dataset of {len(base_dataset)} items")
        self.base_dataset = base_dataset
        self.labels = [int(v) for v in labels]
        self.group_size = int(group_size)
        self.letters = list(string.ascii_lowercase[: self.group_size])
        self.same_fraction = same_fraction
        self.pairing = pairing
        self.seed = seed
        self.num_groups = num_groups
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._groups_epoch: int | None = None
        self._groups: list[Group] = []
        if pairing == "paper":
            self._groups = paper_fixed_pairs(self.labels, rng=np.random.default_rng(seed))
        self._refresh()

    @classmethod
    def from_records(
        cls,
        records: Sequence[dict],
        transform: Any,
        *,
        cache: bool = True,
        group_size: int = 2,
        same_fraction: float = 0.5,
        pairing: str = "balanced",
        seed: int = 0,
        cache_num_workers: int = 0,
        cache_rate: float = 1.0,
        num_groups: int | None = None,
    ) -> GroupDataset:
        """Build the base MONAI dataset (``CacheDataset`` or plain ``Dataset``) and the group dataset on top.

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
        return cls(
            base,
            labels,
            group_size=group_size,
            same_fraction=same_fraction,
            pairing=pairing,
            seed=seed,
            num_groups=num_groups,
        )

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Re-draw balanced groups for ``epoch`` (deterministic in ``seed`` and ``epoch``); no-op for ``paper``."""
        self._epoch.fill_(int(epoch))
        self._refresh()

    def _refresh(self) -> None:
        epoch = self.epoch
        if self.pairing == "paper" or self._groups_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self._groups = draw_balanced_groups(
            self.labels,
            group_size=self.group_size,
            same_fraction=self.same_fraction,
            num_groups=self.num_groups,
            rng=rng,
        )
        self._groups_epoch = epoch

    @property
    def groups(self) -> list[Group]:
        """Index groups (into ``base_dataset``) of the current epoch."""
        self._refresh()
        return list(self._groups)

    def __len__(self) -> int:
        self._refresh()
        return len(self._groups)

    def _image(self, index: int) -> torch.Tensor:
        image = self.base_dataset[index]["image"]
        return image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self._refresh()
        item: dict[str, torch.Tensor] = {}
        for letter, index in zip(self.letters, self._groups[i], strict=True):
            item[f"image_{letter}"] = self._image(index)
            item[f"label_{letter}"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


class GroupRedrawHandler:
    """Ignite handler: ``dataset.set_epoch(engine.state.epoch)`` on every ``EPOCH_STARTED``.

    Ignite creates the epoch's DataLoader iterator after ``EPOCH_STARTED``, so the new groups are used from
    the epoch's first batch; after a resume ``state.epoch`` is restored first, so the groups match an
    uninterrupted run. ``num_groups`` is constant, so the DataLoader length does not change.
    """

    def __init__(self, dataset: GroupDataset) -> None:
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch)
