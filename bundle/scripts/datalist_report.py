"""Curator-facing outputs of a datalist build: the Markdown report and the CSV of skipped files."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .skip_reasons import REASON_DESCRIPTIONS


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table, or "None." when there are no rows."""
    from .reports import markdown_table

    return markdown_table(columns, rows) if rows else ["None."]


def _section(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["", f"## {title}", "", *_table(columns, rows)]


def render_report(report: dict[str, Any]) -> str:
    """Markdown version of a :func:`build_datalist` report, for curators."""
    root = report["dataset_dir"]
    ungraded, imageless = report["patients_without_grade"], report["patients_without_images"]
    skipped = report["skipped"]
    lines = [
        "# Datalist report",
        "",
        f"- Dataset: `{report['dataset_dir']}`",
        f"- Grades CSV: `{report['grades_csv']}`",
        f"- Files scanned: {report['files_scanned']}",
        f"- T1 sagittal slices selected: {report['slices_selected']}",
        f"- Slices in datalist: {report['slices_in_datalist']} from {report['patients_in_datalist']} patients",
        f"- Files skipped: {report['files_skipped']}",
    ]
    lines += _section(
        "Slices per grade",
        ["grade", "label", "patients", "slices"],
        [(g, s["label"], s["patients"], s["slices"]) for g, s in report["per_grade"].items()],
    )
    lines += _section(
        "Slices per patient",
        ["patient", "grade", "label", "series", "slices"],
        [(p["patient_id"], p["grade"], p["label"], p["series"], p["slices"]) for p in report["per_patient"]],
    )
    lines += _section(
        f"Patients with images but no usable grade ({len(ungraded)})",
        ["patient", "series", "slices", "reason"],
        [(p["patient_id"], p["series"], p["slices"], p["reason"]) for p in ungraded],
    )
    lines += _section(
        f"Patients in the CSV without selected images ({len(imageless)})",
        ["patient", "grade", "reason"],
        [(p["patient_id"], p["grade"], p["reason"]) for p in imageless],
    )
    lines += _section(
        "Skipped files by reason",
        ["reason", "files", "meaning"],
        [(r, n, REASON_DESCRIPTIONS.get(r, "")) for r, n in report["skipped_by_reason"].items()],
    )
    lines += _section(
        f"Skipped files ({len(skipped)})",
        ["file", "reason", "detail"],
        [(_relative(s["path"], root), s["reason"], s["detail"]) for s in skipped],
    )
    return "\n".join(lines) + "\n"


def write_skipped_csv(skipped: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write skipped files as CSV (``path,reason,detail``), the machine-readable twin of the report."""
    from .checkpoints import atomic_write

    def write(partial: Path) -> None:
        # errors=backslashreplace: a file name that is not UTF-8 (surrogate escapes in Python) is written escaped
        with partial.open("w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "reason", "detail"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(skipped)

    return atomic_write(path, write)  # whole or absent, also when several processes (ranks) write it
