"""SDL pair sampling: same-grade share, re-drawing, reproducibility, usage, paper pairing, batching."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from scripts.pairs import PairDataset, PairRedrawHandler, draw_balanced_pairs, paper_fixed_pairs

LABELS = [0] * 40 + [1] * 40 + [2] * 40


def _same_share(pairs, labels):
    return sum(labels[a] == labels[b] for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0, 0.0])
def test_same_fraction_exact(fraction):
    pairs = draw_balanced_pairs(LABELS, same_fraction=fraction, rng=np.random.default_rng(0))
    assert len(pairs) == len(LABELS) // 2
    n_same = sum(LABELS[a] == LABELS[b] for a, b in pairs)
    assert n_same == int(fraction * len(pairs) + 0.5)
    assert all(a != b for a, b in pairs)


def test_each_image_used_about_once():
    for seed in range(5):
        pairs = draw_balanced_pairs(LABELS, rng=np.random.default_rng(seed))
        counts = Counter(i for p in pairs for i in p)
        assert max(counts.values()) <= 2
        assert len(counts) >= 0.9 * len(LABELS)


def test_unbalanced_and_singleton_classes():
    labels = [0] * 30 + [1] * 8 + [2]
    pairs = draw_balanced_pairs(labels, same_fraction=0.5, num_pairs=40, rng=np.random.default_rng(1))
    assert len(pairs) == 40
    assert _same_share(pairs, labels) == 0.5
    assert all(labels[a] != 2 or labels[b] != 2 for a, b in pairs)  # singleton never paired with itself
    assert 2 in {labels[i] for p in pairs for i in p}


def test_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        draw_balanced_pairs([1, 1, 1, 1], same_fraction=0.5, rng=np.random.default_rng(0))
    assert len(draw_balanced_pairs([1, 1, 1, 1], same_fraction=1.0, rng=np.random.default_rng(0))) == 2
    with pytest.raises(ValueError, match="same_fraction"):
        draw_balanced_pairs(LABELS, same_fraction=1.5, rng=np.random.default_rng(0))


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


def test_pair_dataset_redraws_and_reproducible():
    ds = PairDataset(_Items(LABELS), LABELS, seed=5)
    first = ds.pairs
    ds.set_epoch(1)
    e1 = ds.pairs
    ds.set_epoch(2)
    e2 = ds.pairs
    assert e1 != e2 and first != e1
    assert len(ds) == len(e1) == len(e2) == len(LABELS) // 2
    other = PairDataset(_Items(LABELS), LABELS, seed=5)
    other.set_epoch(2)
    assert other.pairs == e2
    other.set_epoch(1)
    assert other.pairs == e1
    assert PairDataset(_Items(LABELS), LABELS, seed=6).pairs != first


def test_pair_dataset_paper_never_changes():
    ds = PairDataset(_Items(LABELS), LABELS, pairing="paper", seed=0)
    before = ds.pairs
    ds.set_epoch(3)
    assert ds.pairs == before


def test_pair_item_and_dataloader_batch():
    ds = PairDataset(_Items(LABELS), LABELS, same_fraction=0.5, seed=0)
    item = ds[0]
    a, b = ds.pairs[0]
    assert float(item["image_a"][0, 0, 0]) == a and float(item["image_b"][0, 0, 0]) == b
    assert item["label_a"].dtype == torch.long and item["label_a"].ndim == 0
    assert item["synergic_label"].dtype == torch.float32
    assert float(item["synergic_label"]) == float(LABELS[a] == LABELS[b])
    assert item["patient_id_a"] == f"P{a // 4:03d}"

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)))
    assert tuple(batch["image_a"].shape) == (8, 3, 16, 16)
    assert tuple(batch["image_b"].shape) == (8, 3, 16, 16)
    assert tuple(batch["label_a"].shape) == (8,) and batch["label_a"].dtype == torch.long
    assert tuple(batch["label_b"].shape) == (8,)
    assert tuple(batch["synergic_label"].shape) == (8,) and batch["synergic_label"].dtype == torch.float32
    assert len(batch["patient_id_a"]) == 8
    assert batch["synergic_label"].tolist() == (batch["label_a"] == batch["label_b"]).float().tolist()


def test_distributed_sampler_and_workers_follow_epoch():
    ds = PairDataset(_Items(LABELS), LABELS, seed=0)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True)
    ids = []
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        batch = next(iter(loader))
        ids.append(batch["image_a"][:, 0, 0, 0].long().tolist())
        expected = [ds.pairs[i][0] for i in list(sampler)[:4]]
        assert ids[-1] == expected  # the persistent worker saw the new epoch's pairs
    assert ids[0] != ids[1]


def test_from_records_with_monai_dataset_and_handler():
    records = [
        {"image": np.full((4, 4), i, dtype=np.float32), "label": i % 2, "patient_id": f"P{i}"} for i in range(10)
    ]
    ds = PairDataset.from_records(records, transform=None, cache=True, cache_rate=0.5, seed=1)
    assert isinstance(ds.base_dataset, Dataset)
    assert ds.labels == [r["label"] for r in records]
    assert len(ds) == 5

    seen = []
    engine = Engine(lambda e, b: None)
    handler = PairRedrawHandler(ds)
    handler.attach(engine)
    handler.attach(engine)  # idempotent

    @engine.on(Events.EPOCH_STARTED)
    def record(_):
        seen.append((engine.state.epoch, ds.epoch, ds.pairs))

    engine.run(range(2), max_epochs=3)
    assert [s[:2] for s in seen] == [(1, 1), (2, 2), (3, 3)]
    assert seen[0][2] != seen[1][2]
