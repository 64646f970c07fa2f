"""SDL group sampling: every head's same-grade share, re-drawing, reproducibility, usage, paper pairing, batching."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from scripts.pairs import GroupDataset, GroupRedrawHandler, draw_balanced_groups, paper_fixed_pairs

LABELS = [0] * 40 + [1] * 40 + [2] * 40


def _head_shares(groups, labels):
    """Share of same-grade pairs seen by the head of every pair of positions (i, j)."""
    size = len(groups[0])
    return {
        (i, j): sum(labels[g[i]] == labels[g[j]] for g in groups) / len(groups)
        for i in range(size)
        for j in range(i + 1, size)
    }


@pytest.mark.parametrize("group_size", [2, 3])
@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0, 0.0])
def test_every_head_sees_exactly_the_same_fraction(fraction, group_size):
    groups = draw_balanced_groups(LABELS, group_size=group_size, same_fraction=fraction, rng=np.random.default_rng(0))
    assert len(groups) == len(LABELS)
    n_same = int(fraction * len(groups) + 0.5)
    assert set(_head_shares(groups, LABELS).values()) == {n_same / len(groups)}
    assert all(len(set(g)) == group_size for g in groups)  # distinct images in a group


def test_more_branches_than_grades_keep_the_share_in_expectation():
    """4 branches, 3 grades: a spread group repeats one grade, so the uniform share is lowered to compensate."""
    groups = draw_balanced_groups(LABELS * 10, group_size=4, same_fraction=0.5, rng=np.random.default_rng(0))
    shares = _head_shares(groups, LABELS * 10)
    assert len(shares) == 6
    assert all(abs(v - 0.5) < 0.03 for v in shares.values()), shares
    assert np.mean(list(shares.values())) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="at least 0.167"):
        draw_balanced_groups(LABELS, group_size=4, same_fraction=0.1, rng=np.random.default_rng(0))


@pytest.mark.parametrize("group_size", [2, 3])
def test_each_image_used_about_once_per_branch(group_size):
    for seed in range(5):
        groups = draw_balanced_groups(LABELS, group_size=group_size, rng=np.random.default_rng(seed))
        for position in range(group_size):
            counts = Counter(g[position] for g in groups)
            assert max(counts.values()) <= 2
            assert len(counts) >= 0.9 * len(LABELS)


def test_groups_are_reproducible_from_the_seed():
    draw = lambda seed: draw_balanced_groups(LABELS, group_size=3, rng=np.random.default_rng(seed))  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_unbalanced_and_singleton_classes():
    labels = [0] * 30 + [1] * 8 + [2]
    groups = draw_balanced_groups(labels, same_fraction=0.5, num_groups=40, rng=np.random.default_rng(1))
    assert len(groups) == 40
    assert _head_shares(groups, labels) == {(0, 1): 0.5}
    assert all(labels[a] != 2 or labels[b] != 2 for a, b in groups)  # singleton never paired with itself
    assert 2 in {labels[i] for g in groups for i in g}


def test_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        draw_balanced_groups([1, 1, 1, 1], same_fraction=0.5, rng=np.random.default_rng(0))
    assert len(draw_balanced_groups([1, 1, 1, 1], same_fraction=1.0, rng=np.random.default_rng(0))) == 4
    with pytest.raises(ValueError, match="same_fraction"):
        draw_balanced_groups(LABELS, same_fraction=1.5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2 branches"):
        draw_balanced_groups(LABELS, group_size=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="two branches"):
        GroupDataset(_Items(LABELS), LABELS, group_size=3, pairing="paper")


def test_paper_pairing():
    labels = [0] * 10 + [1] * 7 + [2] * 5
    pairs = paper_fixed_pairs(labels, rng=np.random.default_rng(0))
    same = [p for p in pairs if labels[p[0]] == labels[p[1]]]
    cross = [p for p in pairs if labels[p[0]] != labels[p[1]]]
    # grade 0: first half 5 -> 2 pairs (1 dropped), rest 5 cross; grade 1: 3 -> 1 pair, 4 cross; grade 2: 2 -> 1, 3
    assert len(same) == 2 + 1 + 1
    assert len(cross) == 5 + 4 + 3
    firsts = Counter(labels[a] for a, _ in cross)
    assert firsts == {0: 5, 1: 4, 2: 3}
    assert pairs == paper_fixed_pairs(labels, rng=np.random.default_rng(0))


def test_paper_pairing_single_grade_drops_cross_pairs():
    pairs = paper_fixed_pairs([3] * 8, rng=np.random.default_rng(0))
    assert len(pairs) == 2


class _Items(torch.utils.data.Dataset):
    """Stands in for a CacheDataset over transformed records; counts loads."""

    def __init__(self, labels, size=16):
        self.labels = labels
        self.size = size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.full((3, self.size, self.size), float(i))
        return {"image": image, "label": self.labels[i], "patient_id": f"P{i // 4:03d}"}


def test_group_dataset_redraws_and_reproducible():
    ds = GroupDataset(_Items(LABELS), LABELS, seed=5)
    first = ds.groups
    ds.set_epoch(1)
    e1 = ds.groups
    ds.set_epoch(2)
    e2 = ds.groups
    assert e1 != e2 and first != e1
    assert len(ds) == len(e1) == len(e2) == len(LABELS)
    other = GroupDataset(_Items(LABELS), LABELS, seed=5)
    other.set_epoch(2)
    assert other.groups == e2
    other.set_epoch(1)
    assert other.groups == e1
    assert GroupDataset(_Items(LABELS), LABELS, seed=6).groups != first


def test_group_dataset_paper_never_changes():
    ds = GroupDataset(_Items(LABELS), LABELS, pairing="paper", seed=0)
    before = ds.groups
    ds.set_epoch(3)
    assert ds.groups == before


@pytest.mark.parametrize("group_size", [2, 3])
def test_group_item_and_dataloader_batch(group_size):
    ds = GroupDataset(_Items(LABELS), LABELS, group_size=group_size, same_fraction=0.5, seed=0)
    letters = "abc"[:group_size]
    item = ds[0]
    assert sorted(item) == sorted([f"image_{c}" for c in letters] + [f"label_{c}" for c in letters])
    for letter, index in zip(letters, ds.groups[0], strict=True):
        assert float(item[f"image_{letter}"][0, 0, 0]) == index
        assert item[f"label_{letter}"].dtype == torch.long and int(item[f"label_{letter}"]) == LABELS[index]

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)))
    for letter in letters:
        assert tuple(batch[f"image_{letter}"].shape) == (8, 3, 16, 16)
        assert tuple(batch[f"label_{letter}"].shape) == (8,) and batch[f"label_{letter}"].dtype == torch.long


def test_distributed_sampler_and_workers_follow_epoch():
    ds = GroupDataset(_Items(LABELS), LABELS, seed=0)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True)
    ids = []
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        batch = next(iter(loader))
        ids.append(batch["image_a"][:, 0, 0, 0].long().tolist())
        expected = [ds.groups[i][0] for i in list(sampler)[:4]]
        assert ids[-1] == expected  # the persistent worker saw the new epoch's pairs
    assert ids[0] != ids[1]


def test_from_records_with_monai_dataset_and_handler():
    records = [
        {"image": np.full((4, 4), i, dtype=np.float32), "label": i % 2, "patient_id": f"P{i}"} for i in range(10)
    ]
    ds = GroupDataset.from_records(records, transform=None, cache=True, cache_rate=0.5, seed=1)
    assert isinstance(ds.base_dataset, Dataset)
    assert ds.labels == [r["label"] for r in records]
    assert len(ds) == 10

    seen = []
    engine = Engine(lambda e, b: None)
    handler = GroupRedrawHandler(ds)
    handler.attach(engine)
    handler.attach(engine)  # idempotent

    @engine.on(Events.EPOCH_STARTED)
    def record(_):
        seen.append((engine.state.epoch, ds.epoch, ds.groups))

    engine.run(range(2), max_epochs=3)
    assert [s[:2] for s in seen] == [(1, 1), (2, 2), (3, 3)]
    assert seen[0][2] != seen[1][2]
