"""Benchmark the DICOM indexer on a generated TCIA-shaped tree (>= 10,000 files by default).

Why: the indexer must keep up with a full REMBRANDT download (tens of thousands of slices), so we track files/s
for ``workers=1`` and for the process pool. Generation is not timed: one template per series is written with
:func:`scripts.synthetic_dicom.write_mr_slice`, then each slice is a copy with a new SOPInstanceUID and
InstanceNumber. The tree mixes sagittal T1 slices with distractors (axial T2, sagittal FLAIR, coronal
post-contrast T1, localizers) and a few non-DICOM files, like a real download.

    python benchmarks/bench_indexing.py --files 10000 --workers 2 [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.dicom_index import index_dicom_tree  # noqa: E402
from scripts.synthetic_dicom import AXIAL, CORONAL, LOCALIZER_IMAGE_TYPE, SAGITTAL, write_mr_slice  # noqa: E402

# (description, orientation, TR, TE, extra kwargs, slices per series)
SERIES = [
    ("SAG T1", SAGITTAL, 500.0, 15.0, {}, 24),
    ("AX T2 FSE", AXIAL, 4000.0, 100.0, {}, 24),
    ("SAG FLAIR", SAGITTAL, 9000.0, 120.0, {}, 20),
    ("COR T1 POST GAD", CORONAL, 550.0, 12.0, {"contrast_agent": "MAGNEVIST"}, 20),
    ("SAG T1 POST", SAGITTAL, 550.0, 12.0, {"contrast_agent": "MAGNEVIST"}, 20),
    ("3-PLANE LOC", SAGITTAL, 8.0, 2.0, {"image_type": LOCALIZER_IMAGE_TYPE}, 3),
]
FILES_PER_PATIENT = sum(s[-1] for s in SERIES) + 1  # + one non-DICOM file


def generate_tree(root: Path, n_files: int, size: int = 64) -> int:
    """Write at least ``n_files`` files of ``size`` x ``size`` pixels under ``root``; returns the number written."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 1000, size=(size, size), dtype=np.uint16)
    written = 0
    patient = 0
    while written < n_files:
        pid = f"BENCH-{patient:04d}"
        study_uid = f"1.2.826.0.1.3680043.9.7777.{patient}"
        for s_idx, (desc, orientation, tr, te, extra, n_slices) in enumerate(SERIES, start=1):
            series_uid = f"{study_uid}.{s_idx}"
            series_dir = root / pid / f"study-{patient}" / f"{s_idx}-{desc.replace(' ', '_')}"
            template = write_mr_slice(
                series_dir / "1-01.dcm",
                pixels,
                patient_id=pid,
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=s_idx,
                series_description=desc,
                orientation=orientation,
                repetition_time=tr,
                echo_time=te,
                sop_instance_uid=f"{series_uid}.1",
                **extra,
            )
            ds = pydicom.dcmread(template)
            for inst in range(2, n_slices + 1):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{inst}"
                ds.InstanceNumber = inst
                name = f"1-{inst:02d}.dcm" if inst % 5 else f"1-{inst:02d}"  # some files without suffix
                ds.save_as(series_dir / name, enforce_file_format=True)
            written += n_slices
        (root / pid / "notes.txt").write_text("downloaded with the NBIA data retriever\n")
        written += 1
        patient += 1
    return written


def time_index(root: Path, workers: int, repeats: int) -> tuple[float, float, int, int]:
    """Best wall time over ``repeats`` runs, with the CPU seconds (parent + pool workers) of that run."""
    best, best_cpu = float("inf"), 0.0
    for _ in range(repeats):
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        result = index_dicom_tree(root, workers=workers)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_cpu = elapsed, _cpu_seconds() - cpu_start
    return best, best_cpu, result.files_scanned, result.n_selected


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10000, help="minimum number of files to generate")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pool size for the parallel run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is reported)")
    parser.add_argument("--size", type=int, default=64, help="rows = columns of the generated slices")
    parser.add_argument("--keep", type=Path, default=None, help="generate into (and keep) this directory")
    args = parser.parse_args(argv)

    root = args.keep if args.keep else Path(tempfile.mkdtemp(prefix="bench_indexing_"))
    try:
        if not (root.exists() and any(root.iterdir())):
            start = time.perf_counter()
            n = generate_tree(root, args.files, args.size)
            print(f"generated {n} files in {time.perf_counter() - start:.1f} s under {root}")
        for workers in sorted({1, args.workers}):
            seconds, cpu, scanned, selected = time_index(root, workers, args.repeats)
            print(
                f"workers={workers}: {scanned} files in {seconds:.2f} s = {scanned / seconds:,.0f} files/s "
                f"(CPU {cpu:.2f} s, {scanned / cpu:,.0f} files per CPU-second; "
                f"{selected} T1 sagittal slices selected)"
            )
        print(f"load average after the runs: {os.getloadavg()[0]:.2f} (other processes compete for the cores)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
