"""Write a MONAI Label studies folder of SYNTHETIC demo slices: flat ``.dcm`` files plus ``grades.csv``.

MONAI Label's local datastore lists the files directly in the studies folder (one image per file, the file
name without suffix is the image id), while the demo data and REMBRANDT are DICOM trees with distractor
series. This takes the T1-weighted sagittal slices the bundle's indexer selects from a small generated demo
tree and copies them as ``<PatientID>_<instance>.dcm``, with the patients' grades in ``grades.csv`` (the app's
default grade source for images without a label). Synthetic images, not patient data.

    python monailabel_app/make_demo_studies.py /tmp/sdl_studies --patients-per-grade 2 --slices 3
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

from scripts.demo_data import generate_demo_dataset
from scripts.dicom_index import build_datalist

__all__ = ["make_demo_studies"]


def make_demo_studies(
    out_dir: str | Path,
    *,
    patients_per_grade: int = 2,
    slices_per_patient: int = 3,
    image_size: tuple[int, int] = (160, 160),
    seed: int = 1,
) -> dict[str, Any]:
    """Fill ``out_dir`` with flat demo slices and ``grades.csv``; return counts and the image ids per grade.

    ``seed`` 1 by default: patients drawn apart from the bundle's demo training data (seed 0), so an inference
    on them is not a look-up of a training slice.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdl_demo_tree_") as tmp:
        demo = generate_demo_dataset(
            tmp,
            n_patients_per_grade=patients_per_grade,
            slices_per_series=slices_per_patient,
            image_size=image_size,
            seed=seed,
        )
        records, _ = build_datalist(demo["dicom_dir"], demo["grades_csv"], workers=1)
        grades: dict[str, str] = {}
        ids_by_grade: dict[str, list[str]] = {}
        for record in records:
            image_id = f"{record['patient_id']}_{int(record['instance_number']):02d}"
            shutil.copyfile(record["image"], out / f"{image_id}.dcm")
            grades[record["patient_id"]] = record["grade"]
            ids_by_grade.setdefault(record["grade"], []).append(image_id)
    with open(out / "grades.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Sample", "Grade"])
        writer.writerows(sorted(grades.items()))
    return {"studies": str(out), "images": len(records), "patients": len(grades), "image_ids": ids_by_grade}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="studies folder to fill (created if missing)")
    parser.add_argument("--patients-per-grade", type=int, default=2)
    parser.add_argument("--slices", type=int, default=3, help="sagittal T1 slices per patient")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    summary = make_demo_studies(
        args.out_dir, patients_per_grade=args.patients_per_grade, slices_per_patient=args.slices, seed=args.seed
    )
    print(f"{summary['images']} slices of {summary['patients']} patients in {summary['studies']} (SYNTHETIC)")
    for grade, ids in sorted(summary["image_ids"].items()):
        print(f"  grade {grade}: {', '.join(ids)}")


if __name__ == "__main__":
    main()
