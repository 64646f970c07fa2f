"""Index a TCIA DICOM download, keep the T1-weighted sagittal MR slices and join them to the clinical grades.

TCIA's downloader writes ``<root>/<PatientID>/<study>/<series>/*.dcm``, but real trees also hold localizers,
T2/FLAIR/PD series, axial and coronal planes, structured reports, the odd truncated transfer and files without
a ``.dcm`` suffix. Training on the wrong slices silently ruins the model, so every file is either *selected* or
*skipped with a machine-readable reason* (the ``REASON_*`` constants, explained in ``REASON_DESCRIPTIONS``) and
nothing is dropped unreported. Hidden files and folders (``.DS_Store``, ``.git``) are not candidates.
One bad file never stops the index: any exception while reading a file becomes a skip reason.

Speed: only headers are parsed, by the fast reader in :mod:`.dicom_headers` (pixel data is deferred, never
decoded, and its integrity is checked from lengths). Files are inspected in a process pool over chunks of
paths, because pydicom's parser is pure Python and CPU bound (~2,000 headers/s per process). The report
files are written by :mod:`.datalist_report`; the skip-reason codes live in :mod:`.skip_reasons`, and the rules
that judge one header in :mod:`.dicom_rules`.

Privacy: outputs carry PatientID, UIDs, paths and acquisition facts only; PatientName, PatientBirthDate and
other identifying tags are never copied into records, reports, CSVs or log lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import pydicom
from tqdm import tqdm

from .datalist_report import render_report, write_skipped_csv
from .dicom_headers import read_header
from .dicom_rules import classify_header, skip_outcome
from .flags import as_flag
from .grades import normalise_id, read_grades
from .skip_reasons import (
    REASON_DICOMDIR,
    REASON_DUPLICATE,
    REASON_LINK_LOOP,
    REASON_NOT_DICOM,
    REASON_UNLISTABLE,
    REASON_UNREADABLE,
)

__all__ = [
    "MIN_FILES_FOR_POOL",
    "IndexResult",
    "build_datalist",
    "first_of_each_instance",
    "index_dicom_tree",
    "inspect_file",
    "write_datalist",
]

logger = logging.getLogger(__name__)

# --- tunables --------------------------------------------------------------------------------------------------
# Below this many files a process pool costs more (start-up, pickling) than it saves.
MIN_FILES_FOR_POOL = 400
# Suffixes that are certainly not DICOM: reported without opening the file.
NON_DICOM_SUFFIXES = frozenset(
    {".csv", ".json", ".txt", ".md", ".xml", ".html", ".htm", ".pdf", ".zip", ".gz", ".tgz", ".tar", ".7z",
     ".py", ".log", ".xls", ".xlsx", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nrrd", ".mha"}
)  # fmt: skip


@dataclass
class IndexResult:
    """Outcome of an index: the selected slices (no labels) and every skipped file with its reason.

    ``slices`` are sorted by patient, series and instance number; ``skipped`` entries are
    ``{"path", "reason", "detail"}`` sorted by path.
    """

    root: str
    slices: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    files_scanned: int = 0

    @property
    def n_selected(self) -> int:
        return len(self.slices)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(item["reason"] for item in self.skipped).items()))


# --- per-file inspection (runs in worker processes) -----------------------------------------------------------
def inspect_file(path: str, include_post_contrast: bool = True) -> dict[str, Any]:
    """Classify one file: a slice record ``{"kind": "slice", ...}`` or a skip ``{"kind": "skip", ...}``.

    Never raises: any exception while reading becomes ``REASON_UNREADABLE`` with the exception text.
    """
    suffix = os.path.splitext(path)[1].lower()
    if os.path.basename(path).upper() == "DICOMDIR":  # the name the standard gives a medium's index
        return {"kind": "skip", **skip_outcome(path, REASON_DICOMDIR, "DICOMDIR: a media index, not an image")}
    if suffix in NON_DICOM_SUFFIXES:
        return {"kind": "skip", **skip_outcome(path, REASON_NOT_DICOM, f"not a DICOM file ({suffix} file)")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as fh:
                file_size = os.fstat(fh.fileno()).st_size
                try:
                    ds, tsyntax = read_header(fh)
                except pydicom.errors.InvalidDicomError as exc:
                    return {"kind": "skip", **skip_outcome(path, REASON_NOT_DICOM, f"not a DICOM file ({exc})")}
                outcome = classify_header(path, ds, tsyntax, fh, file_size, include_post_contrast)
    except Exception as exc:  # one bad file must never stop the index
        error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        outcome = skip_outcome(path, REASON_UNREADABLE, error)
    if "reason" in outcome:
        return {"kind": "skip", **outcome}
    return {"kind": "slice", **outcome}


def _inspect_chunk(paths: Sequence[str], include_post_contrast: bool) -> list[dict[str, Any]]:
    return [inspect_file(path, include_post_contrast) for path in paths]


# --- tree walking and the pool ------------------------------------------------------------------------------
def _candidate_files(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Every non-hidden file under ``root`` (hidden directories are pruned), absolute and sorted, and the folders
    that were not walked, as skips: unlistable ones, and symbolic links back into a folder already being walked.

    Symbolic links to folders are followed (TCIA downloads are often assembled from links), each real folder once.
    """
    if root.is_file():
        return [str(root.resolve())], []
    found: list[str] = []
    problems: list[dict[str, str]] = []

    def unlistable(error: OSError) -> None:
        problems.append(skip_outcome(str(error.filename), REASON_UNLISTABLE, f"{error.strerror or error}"))

    walked: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root.resolve(), onerror=unlistable, followlinks=True):
        here = os.path.realpath(dirpath)
        walked.add(here)
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path) if os.path.islink(path) else None
            if real is not None and (real in walked or real == os.path.commonpath([real, here])):
                problems.append(skip_outcome(path, REASON_LINK_LOOP, f"links to {real}, which is already being walked"))
            else:
                kept.append(name)
        dirnames[:] = kept
        found.extend(os.path.join(dirpath, name) for name in filenames if not name.startswith("."))
    return sorted(found), problems


def _inspect_all(paths: list[str], include_post_contrast: bool, workers: int | None) -> list[dict[str, Any]]:
    """Inspect every file, in chunks over a process pool, with a progress bar on a terminal and a summary line
    in the log (100k files take tens of seconds, minutes on a network disk)."""
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    # Several chunks per worker balance uneven files; each chunk is big enough to amortise pickling.
    size = max(32, min(1000, math.ceil(len(paths) / (workers * 6))))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    started = time.perf_counter()
    progress = tqdm(total=len(paths), desc="indexing", unit="file", disable=not sys.stderr.isatty(), leave=False)
    results: list[dict[str, Any]] = []
    skipped = Counter()

    def collect(part: list[dict[str, Any]]) -> None:
        results.extend(part)
        skipped.update(r["kind"] for r in part)
        progress.update(len(part))
        progress.set_postfix(skipped=skipped["skip"], refresh=False)

    with progress:
        if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
            for chunk in chunks:
                collect(_inspect_chunk(chunk, include_post_contrast))
        else:
            try:
                with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                    for part in pool.map(_inspect_chunk, chunks, repeat(include_post_contrast)):
                        collect(part)
            except (BrokenProcessPool, OSError, AssertionError) as exc:  # e.g. no fork allowed, daemonic parent
                logger.warning("process pool unavailable (%s); indexing in-process", type(exc).__name__)
                results.clear()
                skipped.clear()
                progress.reset()
                for chunk in chunks:
                    collect(_inspect_chunk(chunk, include_post_contrast))
    seconds = time.perf_counter() - started
    logger.info(
        "inspected %d files in %.1f s (%.0f files/s), %d skipped",
        len(results),
        seconds,
        len(results) / seconds if seconds > 0 else 0.0,
        skipped["skip"],
    )
    return results


def _patient_from_path(path: str, root: Path) -> str:
    """TCIA layout fallback for an empty PatientID: the first folder below the root."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return ""
    return parts[0] if len(parts) > 1 else ""


def _slice_sort_key(item: dict[str, Any]) -> tuple:
    return (
        normalise_id(item["patient_id"]),
        item["study_uid"],
        item["series_number"] if item["series_number"] is not None else -1,
        item["series_uid"],
        item["instance_number"] if item["instance_number"] is not None else -1,
        item["image"],
    )


def first_of_each_instance(outcomes: Iterable[Mapping[str, Any]]) -> tuple[list[dict], list[dict[str, str]]]:
    """Split :func:`inspect_file` outcomes into selected slices and skip rows, keeping one file per SOPInstanceUID.

    The first selected file of a SOPInstanceUID wins (callers pass outcomes in path order); later copies are
    skipped as duplicates, naming the kept file. Used by the indexer and by the Deploy app's series selector.
    """
    slices: list[dict] = []
    skipped: list[dict[str, str]] = []
    kept_by_uid: dict[str, str] = {}
    for outcome in outcomes:
        outcome = dict(outcome)
        if outcome.pop("kind") == "skip":
            skipped.append(outcome)
            continue
        uid = outcome["sop_instance_uid"]
        if uid and uid in kept_by_uid:
            skipped.append(
                skip_outcome(outcome["image"], REASON_DUPLICATE, f"same SOPInstanceUID as kept file {kept_by_uid[uid]}")
            )
            continue
        if uid:
            kept_by_uid[uid] = outcome["image"]
        slices.append(outcome)
    return slices, skipped


def index_dicom_tree(
    root: str | Path, *, include_post_contrast: bool = True, workers: int | None = None
) -> IndexResult:
    """Index every candidate file under ``root`` (a tree, a series folder or one file): the selection for
    training's datalist (:func:`build_datalist`) and for inference, where no grades are involved.

    Returns selected T1-weighted sagittal MR slices and the skipped files with reasons. An empty selection
    is not an error here (callers decide); a missing ``root`` raises ``FileNotFoundError``.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"DICOM root not found: {root_path}")
    resolved = root_path.resolve()
    paths, folders_not_walked = _candidate_files(resolved)
    outcomes = _inspect_all(paths, as_flag(include_post_contrast), workers)  # `--... false` arrives as text

    result = IndexResult(root=str(resolved), files_scanned=len(paths))
    result.skipped.extend(folders_not_walked)
    slices, skipped = first_of_each_instance(outcomes)  # outcomes are in sorted path order
    result.skipped.extend(skipped)
    for outcome in slices:
        if not outcome["patient_id"]:
            outcome["patient_id"] = _patient_from_path(outcome["image"], resolved)
        result.slices.append(outcome)
    result.slices.sort(key=_slice_sort_key)
    result.skipped.sort(key=lambda item: item["path"])
    return result


# --- join with grades ------------------------------------------------------------------------------------------
_RECORD_KEYS = (
    "image", "label", "grade", "patient_id", "study_uid", "series_uid", "sop_instance_uid",
    "instance_number", "series_number", "series_description", "rows", "columns",
)  # fmt: skip


def _as_label_map(label_map: Mapping[str, Any] | None) -> dict[str, int] | None:
    return None if label_map is None else {str(k): int(v) for k, v in dict(label_map).items()}


def _as_aliases(aliases: Mapping[str, Any] | None) -> dict[str, str] | None:
    return None if aliases is None else {str(k): str(v) for k, v in dict(aliases).items()}


def build_datalist(
    dataset_dir: str | Path,
    grades_csv: str | Path,
    *,
    patient_column: str = "Sample",
    grade_column: str = "Grade",
    label_map: Mapping[str, int] | None = None,
    grade_aliases: Mapping[str, str] | None = None,
    include_post_contrast: bool = True,
    workers: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Index ``dataset_dir``, join the slices to the grades in ``grades_csv`` and return (records, report).

    Slices of patients without a usable grade (missing, unrecognised, conflicting, not in the CSV) are left
    out of the records but listed in ``report["patients_without_grade"]``; CSV patients without any selected
    slice are listed in ``report["patients_without_images"]``.
    """
    dataset_dir, grades_csv = Path(dataset_dir), Path(grades_csv)
    if not dataset_dir.exists():
        raise FileNotFoundError(f"dataset directory not found: {dataset_dir}")
    table = read_grades(
        grades_csv,
        patient_column=patient_column,
        grade_column=grade_column,
        label_map=_as_label_map(label_map),
        grade_aliases=_as_aliases(grade_aliases),
    )
    index = index_dicom_tree(dataset_dir, include_post_contrast=include_post_contrast, workers=workers)

    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in index.slices:
        by_patient[normalise_id(item["patient_id"])].append(item)

    records: list[dict[str, Any]] = []
    per_patient: list[dict[str, Any]] = []
    without_grade: list[dict[str, Any]] = []
    for key, slices in by_patient.items():
        patient_id = slices[0]["patient_id"]
        n_series = len({s["series_uid"] for s in slices})
        grade = table.lookup(key)
        if grade is None:
            entry = {"patient_id": patient_id, "series": n_series, "slices": len(slices), "reason": table.problem(key)}
            without_grade.append(entry)
            continue
        per_patient.append(
            {"patient_id": patient_id, "grade": grade.grade, "label": grade.label, "series": n_series,
             "slices": len(slices)}
        )  # fmt: skip
        for item in slices:
            record = {**item, "label": grade.label, "grade": grade.grade}
            records.append({k: record[k] for k in _RECORD_KEYS})

    without_images = [
        {"patient_id": table.display_ids[key], "grade": table.grades[key].grade if key in table.grades else None,
         "reason": table.problem(key) or "no selected T1 sagittal slice"}
        for key in sorted(table.display_ids)
        if key not in by_patient
    ]  # fmt: skip

    per_grade: dict[str, dict[str, Any]] = {}
    for entry in per_patient:
        stats = per_grade.setdefault(entry["grade"], {"label": entry["label"], "patients": 0, "slices": 0})
        stats["patients"] += 1
        stats["slices"] += entry["slices"]
    report = {
        "dataset_dir": str(dataset_dir.resolve()),
        "grades_csv": str(grades_csv.resolve()),
        "files_scanned": index.files_scanned,
        "slices_selected": index.n_selected,
        "slices_in_datalist": len(records),
        "patients_in_datalist": len(per_patient),
        "files_skipped": index.n_skipped,
        "skipped_by_reason": index.skipped_by_reason,
        "per_grade": dict(sorted(per_grade.items(), key=lambda kv: kv[1]["label"])),
        "per_patient": per_patient,
        "patients_without_grade": without_grade,
        "patients_without_images": without_images,
        "csv_rows": table.rows,
        "csv_rows_without_patient": table.rows_without_patient,
        "skipped": index.skipped,
    }
    return records, report


def write_datalist(
    dataset_dir: str | Path,
    grades_csv: str | Path,
    datalist: str | Path,
    *,
    patient_column: str = "Sample",
    grade_column: str = "Grade",
    label_map: Mapping[str, int] | None = None,
    grade_aliases: Mapping[str, str] | None = None,
    include_post_contrast: bool = True,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Build the datalist and write it with its reports; returns the records.

    Writes ``datalist`` (JSON list of records), ``<stem>_report.md`` and ``<stem>_skipped.csv`` beside it.
    Raises ``RuntimeError`` (after writing the reports) when no slice could be joined to a grade.
    """
    records, report = build_datalist(
        dataset_dir,
        grades_csv,
        patient_column=patient_column,
        grade_column=grade_column,
        label_map=label_map,
        grade_aliases=grade_aliases,
        include_post_contrast=include_post_contrast,
        workers=workers,
    )
    out = Path(datalist)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_path = out.with_name(f"{out.stem}_report.md")
    skipped_path = out.with_name(f"{out.stem}_skipped.csv")
    report_path.write_text(render_report(report), encoding="utf-8", errors="backslashreplace")  # any file name
    write_skipped_csv(report["skipped"], skipped_path)
    if not records:
        raise ValueError(
            f"no slice in {dataset_dir} could be joined to a grade from {grades_csv}; see {report_path} "
            f"({report['slices_selected']} T1 sagittal slices selected, {report['files_skipped']} files skipped)"
        )
    out.write_text(json.dumps(records, indent=1), encoding="utf-8")
    grades = ", ".join(f"{g}: {s['slices']}" for g, s in report["per_grade"].items())
    logger.info(
        "datalist %s: %d slices from %d patients (%s); %d files skipped; %d patients without grade, "
        "%d without images; report %s",
        out, len(records), report["patients_in_datalist"], grades, report["files_skipped"],
        len(report["patients_without_grade"]), len(report["patients_without_images"]), report_path,
    )  # fmt: skip
    return records
