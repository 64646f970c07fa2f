"""Train/validation/test splits of slice records (dicts with ``image``, ``label`` and ``patient_id``).

REMBRANDT gives one grade per patient and many near-identical neighbouring slices per patient, so the honest
protocol splits *patients* (:func:`split_by_patient`, :func:`patient_kfold`). The paper's slice-level split
(:func:`split_by_slice`) is kept only to reproduce its numbers.

All functions are deterministic for a given ``seed`` and independent of the input order: patients and
records are put in a canonical order (patient id, image path) before the seeded shuffle, and every part is
returned in that canonical order. Counts are allocated per grade by hand rather than with MONAI's
``partition_dataset_classes`` because that rounds each part independently and can leave a grade without a
single test patient, while we guarantee one patient per grade in each requested part when a grade has at
least three patients.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PROTOCOLS",
    "inner_fold_split",
    "make_splits",
    "patient_kfold",
    "patient_labels",
    "split_by_patient",
    "split_by_slice",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("patient", "slice", "kfold")
Record = dict[str, Any]


def _record_key(record: Record) -> tuple[str, str]:
    return str(record["patient_id"]), str(record.get("image", ""))


def _canonical(records: Sequence[Record]) -> list[Record]:
    return sorted(records, key=_record_key)


def _check_fractions(*fractions: float) -> None:
    if any(f < 0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"fractions must be >= 0 and sum to less than 1, got {fractions}")


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even, which makes counts jump oddly)."""
    return int(np.floor(x + 0.5))


def _allocate(n: int, val_fraction: float, test_fraction: float, ensure_each: bool) -> tuple[int, int]:
    """Number of items of one grade for (validation, test); the rest is train.

    With ``ensure_each`` and n >= 3 every part that was asked for (fraction > 0) gets at least one item,
    and train always keeps at least one.
    """
    n_val, n_test = _round(n * val_fraction), _round(n * test_fraction)
    if ensure_each and n >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    while n_val + n_test > n - 1 and n_val + n_test > 0:  # keep one for training
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def patient_labels(records: Sequence[Record]) -> dict[str, int]:
    """Map patient id -> grade label; a patient whose slices disagree is an error, not a tie to break."""
    labels: dict[str, set[int]] = defaultdict(set)
    for r in records:
        labels[str(r["patient_id"])].add(int(r["label"]))
    mixed = {p: sorted(v) for p, v in labels.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"patients with records of different labels (one grade per patient expected): {mixed}")
    return {p: next(iter(v)) for p, v in sorted(labels.items())}


def _patients_by_grade(records: Sequence[Record]) -> dict[int, list[str]]:
    by_grade: dict[int, list[str]] = defaultdict(list)
    for patient, label in patient_labels(records).items():  # sorted by patient id
        by_grade[label].append(patient)
    return dict(sorted(by_grade.items()))


def _records_of(records: Sequence[Record], patients: set[str]) -> list[Record]:
    return [r for r in _canonical(records) if str(r["patient_id"]) in patients]


def _split_patients(
    by_grade: dict[int, list[str]], val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for patients in by_grade.values():
        shuffled = [patients[i] for i in rng.permutation(len(patients))]
        n_val, n_test = _allocate(len(shuffled), val_fraction, test_fraction, ensure_each=True)
        parts["test"].update(shuffled[:n_test])
        parts["validation"].update(shuffled[n_test : n_test + n_val])
        parts["train"].update(shuffled[n_test + n_val :])
    return parts


def split_by_patient(
    records: Sequence[Record], *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[Record]]:
    """Patient-level split stratified by grade: all slices of a patient land in exactly one part.

    Fractions are of patients per grade (rounded half up); a grade with >= 3 patients gets at least one
    patient in every part whose fraction is > 0.
    """
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    parts = _split_patients(_patients_by_grade(records), val_fraction, test_fraction, rng)
    return {name: _records_of(records, patients) for name, patients in parts.items()}


def split_by_slice(
    records: Sequence[Record], *, val_fraction: float = 0.0, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[Record]]:
    """The paper's slice-level split, stratified by label. LEAKY: use only to reproduce the paper.

    Neighbouring slices of one patient are almost identical and share the patient's grade, so a model
    tested on slices of patients it was trained on is partly recognising the patient, not the grade;
    accuracy is inflated compared with :func:`split_by_patient`.
    """
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    ordered = _canonical(records)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(ordered):
        by_label[int(r["label"])].append(i)
    chosen: dict[str, set[int]] = {"train": set(), "validation": set(), "test": set()}
    for _, indices in sorted(by_label.items()):
        shuffled = [indices[i] for i in rng.permutation(len(indices))]
        n_val, n_test = _allocate(len(shuffled), val_fraction, test_fraction, ensure_each=False)
        chosen["test"].update(shuffled[:n_test])
        chosen["validation"].update(shuffled[n_test : n_test + n_val])
        chosen["train"].update(shuffled[n_test + n_val :])
    return {name: [ordered[i] for i in sorted(idx)] for name, idx in chosen.items()}


def patient_kfold(
    records: Sequence[Record], *, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.0
) -> list[dict[str, list[Record]]]:
    """Patient-grouped, grade-stratified k-fold: every patient is in exactly one fold's ``test`` part.

    Patients of each grade are shuffled and dealt round-robin to the folds; the dealing position carries
    over from one grade to the next so fold sizes differ by at most one patient. ``validation`` is carved
    per grade from each fold's training patients (empty when ``val_fraction`` is 0).
    """
    _check_fractions(val_fraction)
    by_grade = _patients_by_grade(records)
    n_patients = sum(len(p) for p in by_grade.values())
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > n_patients:
        raise ValueError(f"n_folds={n_folds} is more than the number of patients ({n_patients})")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    position = 0
    for patients in by_grade.values():
        for i in rng.permutation(len(patients)):
            fold_of[patients[i]] = position % n_folds
            position += 1

    folds = []
    for k in range(n_folds):
        test = {p for p, f in fold_of.items() if f == k}
        rest = {g: [p for p in ps if p not in test] for g, ps in by_grade.items()}
        parts = _split_patients(rest, val_fraction, 0.0, np.random.default_rng([seed, k]))
        folds.append(
            {
                "train": _records_of(records, parts["train"]),
                "validation": _records_of(records, parts["validation"]),
                "test": _records_of(records, test),
            }
        )
    return folds


def make_splits(
    records: Sequence[Record],
    *,
    protocol: str = "patient",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    fold: int = 0,
    n_folds: int = 5,
) -> dict[str, list[Record]]:
    """Dispatch to :func:`split_by_patient` (``"patient"``, the default), :func:`split_by_slice` (``"slice"``)
    or fold ``fold`` of :func:`patient_kfold` (``"kfold"``, used by ``run cross_validation``; its validation
    part is ``val_fraction`` of the fold's training patients).

    Records carrying a predefined ``split`` (an image folder's Training/Testing folders, `scripts.image_folder`)
    keep it: ``test`` is the predefined test set (``test_fraction`` is not used) and, unless a validation folder
    exists, ``validation`` is carved from the training records with ``val_fraction``, so the checkpoint is still
    chosen without looking at the test set. Under ``kfold`` the predefined split is pooled (logged):
    cross-validation deals every image to a fold, so a fixed test folder cannot hold.
    """
    records = list(records)
    if protocol == "kfold" and any("split" in r for r in records):
        logger.warning("split_protocol kfold: the predefined Training/Testing split is pooled into the folds")
        records = [{k: v for k, v in r.items() if k != "split"} for r in records]
    if any("split" in r for r in records):
        return _keep_predefined_split(records, protocol=protocol, val_fraction=val_fraction, seed=seed)
    return _split(records, protocol, val_fraction, test_fraction, seed, fold, n_folds)


def _keep_predefined_split(records: list[Record], *, protocol: str, val_fraction: float, seed: int) -> dict:
    """The records' own train/validation/test, a validation part carved from train when there is none."""
    unknown = sorted({str(r.get("split")) for r in records} - {"train", "validation", "test"})
    if unknown:
        raise ValueError(f"records with a predefined split must use train/validation/test, found {unknown}")

    def part(name: str) -> list[Record]:
        return sorted((r for r in records if r["split"] == name), key=lambda r: (str(r["patient_id"]), r["image"]))

    train, validation, test = part("train"), part("validation"), part("test")
    if not validation:
        carved = _split(train, protocol, val_fraction, test_fraction=0.0, seed=seed, fold=0, n_folds=1)
        train, validation = carved["train"], carved["validation"]
    logger.info(
        "predefined split kept: %d train, %d validation%s, %d test (test_fraction unused)",
        len(train),
        len(validation),
        "" if part("validation") else f" (val_fraction {val_fraction} of the training folder)",
        len(test),
    )
    return {"train": train, "validation": validation, "test": test}


def _split(
    records: list[Record], protocol: str, val_fraction: float, test_fraction: float, seed: int, fold: int, n_folds: int
) -> dict[str, list[Record]]:
    """The protocol's split of records without a predefined one."""
    if protocol == "kfold":
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
        splits = patient_kfold(records, n_folds=n_folds, seed=seed, val_fraction=val_fraction)[fold]
    elif protocol == "patient":
        splits = split_by_patient(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    elif protocol == "slice":
        splits = split_by_slice(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    else:
        raise ValueError(f"unknown split protocol {protocol!r}; choose one of {PROTOCOLS}")
    if val_fraction > 0 and not splits["validation"]:
        # Without validation slices no checkpoint is ever chosen; say so now, not after training.
        raise ValueError(
            f"the {protocol} split left no validation slices (val_fraction={val_fraction}, "
            f"{len(patient_labels(records))} patients): too few patients per grade; use more data or a larger "
            "val_fraction"
        )
    return splits


def inner_fold_split(
    outer: dict[str, list[Record]], *, fold: int, n_folds: int, seed: int = 0
) -> dict[str, list[Record]]:
    """Fold ``fold`` of a patient k-fold over the *training* patients of an outer split (nested validation).

    The outer ``train`` and ``validation`` parts are pooled and dealt into ``n_folds`` grade-stratified,
    patient-grouped folds (:func:`patient_kfold`): fold ``fold`` is ``validation``, the others ``train``. The
    outer ``test`` part is dropped (``test`` is empty), so a hyperparameter search that scores settings on
    these validation folds never sees a test patient. An outer slice-level split is refused: its test
    patients also have slices in its training part.
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"inner fold must be in 0..{n_folds - 1}, got {fold}")
    test_patients = {str(r["patient_id"]) for r in outer.get("test", [])}
    pool = [*outer.get("train", []), *outer.get("validation", [])]
    shared = sorted(test_patients & {str(r["patient_id"]) for r in pool})
    if shared:
        raise ValueError(
            f"the outer split puts {len(shared)} test patient(s) in its training part too (a slice-level split?): "
            "inner folds need a patient-level outer split (split_protocol patient or kfold)"
        )
    part = patient_kfold(pool, n_folds=n_folds, seed=seed)[fold]
    return {"train": part["train"], "validation": part["test"], "test": []}
