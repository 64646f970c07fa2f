"""Curator-facing outputs of a datalist build: the Markdown report and the CSV of skipped files."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .skip_reasons import REASON_DESCRIPTIONS


def _md(value: Any) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def render_report(report: dict[str, Any]) -> str:
    """Markdown version of a :func:`build_datalist` report, for curators."""
    root = report["dataset_dir"]
    lines = [
        "# Datalist report",
        "",
        f"- Dataset: `{report['dataset_dir']}`",
        f"- Grades CSV: `{report['grades_csv']}`",
        f"- Files scanned: {report['files_scanned']}",
        f"- T1 sagittal slices selected: {report['slices_selected']}",
        f"- Slices in datalist: {report['slices_in_datalist']} from {report['patients_in_datalist']} patients",
        f"- Files skipped: {report['files_skipped']}",
        "",
        "## Slices per grade",
        "",
        "| grade | label | patients | slices |",
        "|---|---|---|---|",
    ]
    lines += [f"| {_md(g)} | {s['label']} | {s['patients']} | {s['slices']} |" for g, s in report["per_grade"].items()]
    lines += ["", "## Slices per patient", "", "| patient | grade | label | series | slices |", "|---|---|---|---|---|"]
    lines += [
        f"| {_md(p['patient_id'])} | {_md(p['grade'])} | {p['label']} | {p['series']} | {p['slices']} |"
        for p in report["per_patient"]
    ]
    lines += ["", f"## Patients with images but no usable grade ({len(report['patients_without_grade'])})", ""]
    if report["patients_without_grade"]:
        lines += ["| patient | series | slices | reason |", "|---|---|---|---|"]
        lines += [
            f"| {_md(p['patient_id'])} | {p['series']} | {p['slices']} | {_md(p['reason'])} |"
            for p in report["patients_without_grade"]
        ]
    else:
        lines.append("None.")
    lines += ["", f"## Patients in the CSV without selected images ({len(report['patients_without_images'])})", ""]
    if report["patients_without_images"]:
        lines += ["| patient | grade | reason |", "|---|---|---|"]
        lines += [
            f"| {_md(p['patient_id'])} | {_md(p['grade'])} | {_md(p['reason'])} |"
            for p in report["patients_without_images"]
        ]
    else:
        lines.append("None.")
    lines += ["", "## Skipped files by reason", "", "| reason | files | meaning |", "|---|---|---|"]
    lines += [
        f"| {_md(r)} | {n} | {_md(REASON_DESCRIPTIONS.get(r, ''))} |" for r, n in report["skipped_by_reason"].items()
    ]
    lines += ["", f"## Skipped files ({len(report['skipped'])})", ""]
    if report["skipped"]:
        lines += ["| file | reason | detail |", "|---|---|---|"]
        lines += [
            f"| {_md(_relative(s['path'], root))} | {_md(s['reason'])} | {_md(s['detail'])} |"
            for s in report["skipped"]
        ]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_skipped_csv(skipped: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write skipped files as CSV (``path,reason,detail``), the machine-readable twin of the report."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "reason", "detail"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(skipped)
    return path
