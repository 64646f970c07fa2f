"""Patient/slice splits and patient k-fold: leakage, stratification, determinism, coverage."""

from __future__ import annotations

import random

import pytest
from scripts.splits import make_splits, patient_kfold, split_by_patient, split_by_slice

SEEDS = [0, 1, 7, 42]


def _records(n_patients: int = 30, seed: int = 0) -> list[dict]:
    """~n_patients patients with 6..14 slices each; grades unbalanced (about 27/33/40 %)."""
    rng = random.Random(seed)
    records = []
    for p in range(n_patients):
        label = 0 if p < n_patients * 0.27 else (1 if p < n_patients * 0.6 else 2)
        for s in range(rng.randint(6, 14)):
            records.append({"image": f"/data/P{p:03d}/slice{s:02d}.dcm", "label": label, "patient_id": f"P{p:03d}"})
    return records


def _patients(records: list[dict]) -> set[str]:
    return {r["patient_id"] for r in records}


def _ids(split: dict) -> dict:
    return {k: [r["image"] for r in v] for k, v in split.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_patient_split_no_leak_and_stratified(seed):
    records = _records(seed=seed)
    split = split_by_patient(records, seed=seed)
    assert set(split) == {"train", "validation", "test"}
    parts = {k: _patients(v) for k, v in split.items()}
    assert not parts["train"] & parts["test"]
    assert not parts["train"] & parts["validation"]
    assert not parts["validation"] & parts["test"]
    assert sum(len(v) for v in split.values()) == len(records)
    for name, recs in split.items():
        assert {r["label"] for r in recs} == {0, 1, 2}, f"{name} misses a grade"


@pytest.mark.parametrize("seed", SEEDS)
def test_patient_split_deterministic_and_order_independent(seed):
    records = _records()
    shuffled = records[:]
    random.Random(seed + 100).shuffle(shuffled)
    a = split_by_patient(records, seed=seed)
    assert _ids(a) == _ids(split_by_patient(records, seed=seed))
    assert _ids(a) == _ids(split_by_patient(shuffled, seed=seed))
    others = [_ids(split_by_patient(records, seed=s)) for s in SEEDS if s != seed]
    assert any(o != _ids(a) for o in others)


def test_patient_split_small_grade_still_in_every_part():
    records = [{"image": f"{p}/{s}", "label": p % 3, "patient_id": str(p)} for p in range(9) for s in range(3)]
    split = split_by_patient(records, val_fraction=0.1, test_fraction=0.1)
    for recs in split.values():
        assert {r["label"] for r in recs} == {0, 1, 2}


def test_mixed_labels_raise():
    records = _records()
    records[0] = {**records[0], "label": (records[0]["label"] + 1) % 3}
    with pytest.raises(ValueError, match="different labels"):
        split_by_patient(records)


@pytest.mark.parametrize("seed", SEEDS)
def test_slice_split_reproduces_fraction(seed):
    records = _records(seed=seed)
    split = split_by_slice(records, test_fraction=0.1, seed=seed)
    assert split["validation"] == []
    assert abs(len(split["test"]) - 0.1 * len(records)) <= 3  # one rounding per grade
    for label in (0, 1, 2):
        n = sum(r["label"] == label for r in records)
        n_test = sum(r["label"] == label for r in split["test"])
        assert n_test == int(n * 0.1 + 0.5)
    assert sorted(r["image"] for v in split.values() for r in v) == sorted(r["image"] for r in records)
    shuffled = records[::-1]
    assert _ids(split) == _ids(split_by_slice(shuffled, test_fraction=0.1, seed=seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_kfold_covers_every_patient_once(seed):
    records = _records(seed=seed)
    folds = patient_kfold(records, n_folds=5, seed=seed)
    assert len(folds) == 5
    test_patients = [_patients(f["test"]) for f in folds]
    assert sorted(p for t in test_patients for p in t) == sorted(_patients(records))
    sizes = [len(t) for t in test_patients]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        assert not _patients(fold["train"]) & _patients(fold["test"])
        assert fold["validation"] == []
        assert {r["label"] for r in fold["test"]} == {0, 1, 2}
        assert len(fold["train"]) + len(fold["test"]) == len(records)
    assert [_ids(f) for f in folds] == [_ids(f) for f in patient_kfold(records[::-1], n_folds=5, seed=seed)]


def test_kfold_validation_carved_from_train():
    records = _records()
    for fold in patient_kfold(records, n_folds=3, val_fraction=0.2, seed=1):
        train, val, test = (_patients(fold[k]) for k in ("train", "validation", "test"))
        assert val and not val & train and not val & test
        assert {r["label"] for r in fold["validation"]} == {0, 1, 2}


def test_kfold_too_many_folds():
    records = _records(n_patients=4)
    with pytest.raises(ValueError, match="number of patients"):
        patient_kfold(records, n_folds=5)


def test_make_splits_dispatch():
    records = _records()
    assert _ids(make_splits(records, protocol="patient", seed=3)) == _ids(split_by_patient(records, seed=3))
    assert _ids(make_splits(records, protocol="slice", seed=3)) == _ids(
        split_by_slice(records, val_fraction=0.15, test_fraction=0.15, seed=3)
    )
    with pytest.raises(ValueError, match="patient.*slice"):
        make_splits(records, protocol="random")


def test_invalid_fractions():
    with pytest.raises(ValueError, match="fractions"):
        split_by_patient(_records(), val_fraction=0.5, test_fraction=0.5)
