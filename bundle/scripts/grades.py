"""Read the clinical CSV and turn its free-text tumour grades into class labels.

REMBRANDT's clinical sheet (and the copies people pass around) spells the WHO grade many ways: "II", "2",
"Grade II", "G2", "WHO III", or a diagnosis such as "GBM". This module normalises every spelling to one
canonical grade ("II"/"III"/"IV"), then maps it to an integer label through a configurable ``label_map`` so
other class sets (e.g. LGG/HGG) work without code changes:

    canonical = canonical_grade(value, aliases)   # "grade 2" -> "II"; with aliases {"II": "LGG"} -> "LGG"
    label = label_map[canonical]

Rows that cannot be graded (empty, "NA", unknown words) and patients whose rows disagree are *reported*
rather than dropped silently or overwritten, so a curator can see exactly why a patient is missing.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_LABEL_MAP: dict[str, int] = {"II": 0, "III": 1, "IV": 2}


def resolve_label_map(
    image_folder: str | Path | None = None, default: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The label map of a run: the image folder's class names when one is given (`scripts.image_folder`), else
    ``default`` (the glioma grades, :data:`DEFAULT_LABEL_MAP`); a user's ``--label_map`` replaces this whole
    config node."""
    if image_folder:
        from scripts.image_folder import folder_label_map

        return folder_label_map(image_folder)
    return {str(k): int(v) for k, v in dict(DEFAULT_LABEL_MAP if default is None else default).items()}


# Diagnoses that imply a WHO grade. Keys are normalised (upper case, single spaces).
BUILTIN_ALIASES: dict[str, str] = {
    "GBM": "IV",
    "GLIOBLASTOMA": "IV",
    "GLIOBLASTOMA MULTIFORME": "IV",
}

# Values that mean "no grade recorded" (reported as missing, not as unrecognised).
MISSING_VALUES = frozenset({"", "NA", "N/A", "NAN", "NONE", "NULL", "-", "--", "?", "UNKNOWN", "NOT AVAILABLE", "ND"})

_ROMAN = {"I": "I", "II": "II", "III": "III", "IV": "IV", "1": "I", "2": "II", "3": "III", "4": "IV"}
_GRADE_RE = re.compile(r"^(?:WHO)?\s*(?:GRADE|GR\.?|G)?\s*[-:#]?\s*(IV|I{1,3}|[1-4])(?:\.0)?$")


def normalise_id(patient_id: object) -> str:
    """Key used to match patient ids between the CSV and DICOM headers: stripped and case-insensitive."""
    return str(patient_id).strip().upper()


def _normalise_value(value: object) -> str:
    return " ".join(str(value if value is not None else "").replace("_", " ").split()).upper()


def _normalise_aliases(aliases: Mapping[str, str] | None) -> dict[str, str]:
    return {_normalise_value(k): str(v).strip() for k, v in (aliases or {}).items()}


def canonical_grade(value: object, aliases: Mapping[str, str] | None = None) -> str | None:
    """Return the canonical grade for ``value`` or ``None`` when it holds no grade.

    Spellings of the WHO grade ("2", "grade II", "G2", "WHO III", "GBM") become "I"-"IV". ``aliases`` then
    maps either the raw value or that canonical grade to another class name (``{"II": "LGG", "III": "HGG"}``);
    user aliases win over the built-in diagnosis aliases. A value that is neither a known spelling nor an
    alias is returned normalised (upper case), so :func:`grade_to_label` can still accept it when it is a
    ``label_map`` key, and report it as unrecognised otherwise.
    """
    text = _normalise_value(value)
    if text in MISSING_VALUES:
        return None
    user = _normalise_aliases(aliases)
    if text in user:
        return user[text]
    match = _GRADE_RE.match(text)
    if match:
        grade = _ROMAN[match.group(1)]
    elif text in BUILTIN_ALIASES:
        grade = BUILTIN_ALIASES[text]
    else:
        return text
    return user.get(grade, grade)


def grade_to_label(
    value: object, label_map: Mapping[str, int] | None = None, aliases: Mapping[str, str] | None = None
) -> tuple[str | None, int | None, str]:
    """Map a raw CSV value to ``(canonical grade, label, problem)``; ``problem`` is "" on success.

    A value equal to a ``label_map`` key (case-insensitively) is accepted as-is, so a CSV that already holds
    "LGG"/"HGG" works with ``label_map={"LGG": 0, "HGG": 1}`` and no aliases.
    """
    label_map = DEFAULT_LABEL_MAP if label_map is None else label_map
    keys = {str(k).strip().upper(): k for k in label_map}
    text = _normalise_value(value)
    if text in keys:
        key = keys[text]
        return str(key), int(label_map[key]), ""
    grade = canonical_grade(value, aliases)
    if grade is None:
        return None, None, "missing grade"
    key = keys.get(grade.upper())
    if key is None:
        return None, None, f"unrecognised grade {str(value).strip()!r}"
    return str(key), int(label_map[key]), ""


@dataclass
class PatientGrade:
    """The single, consistent grade of one patient."""

    patient_id: str
    grade: str
    label: int


@dataclass
class GradeTable:
    """Grades read from one CSV, keyed by :func:`normalise_id`.

    ``without_grade`` maps patients whose rows carry no usable grade to the reason; ``conflicting`` maps
    patients whose rows disagree to the distinct grades found (those patients are excluded from ``grades``).
    """

    path: str
    grades: dict[str, PatientGrade] = field(default_factory=dict)
    without_grade: dict[str, str] = field(default_factory=dict)
    conflicting: dict[str, list[str]] = field(default_factory=dict)
    display_ids: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    rows_without_patient: int = 0

    def lookup(self, patient_id: str) -> PatientGrade | None:
        return self.grades.get(normalise_id(patient_id))

    def problem(self, patient_id: str) -> str:
        """Why ``patient_id`` has no grade ("not in the CSV", "missing grade", "conflicting grades ...")."""
        key = normalise_id(patient_id)
        if key in self.conflicting:
            return "conflicting grades " + ", ".join(self.conflicting[key])
        if key in self.without_grade:
            return self.without_grade[key]
        if key not in self.display_ids:
            return "not in the grades CSV"
        return ""


def _resolve_column(requested: str, fieldnames: list[str], path: Path) -> str:
    """Find ``requested`` among the CSV's headers: exact match first, then a unique case-insensitive one."""
    if requested in fieldnames:
        return requested
    wanted = requested.strip().casefold()
    matches = [name for name in fieldnames if name.casefold() == wanted]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(repr(name) for name in fieldnames) or "(none)"
    if len(matches) > 1:
        raise ValueError(
            f"column {requested!r} is ambiguous in {path}: it matches {matches} case-insensitively; "
            f"available columns: {available}"
        )
    raise ValueError(f"column {requested!r} not found in {path}; available columns: {available}")


def _sniff_dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample.splitlines()[0] if sample else "", delimiters=",;\t")
    except csv.Error:
        return csv.excel


_EXCEL_SIGNATURES = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0")  # .xlsx (a zip) and .xls (an OLE file)


def _table_text(path: Path) -> str:
    """The text of a grade table: UTF-8 (with or without BOM), UTF-16 with a BOM, else Latin-1 (with a warning).

    TCIA's clinical tables often come as Excel workbooks; one is refused with a message saying so rather than
    failing on its bytes.
    """
    raw = path.read_bytes()
    if raw.startswith(_EXCEL_SIGNATURES):
        raise ValueError(
            f"grades table {path} is an Excel workbook, not a CSV: open it in a spreadsheet and save the sheet with "
            "the patient and grade columns as CSV (UTF-8), then pass that file as --grades_csv"
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        logger.warning("grades CSV %s is not UTF-8 (byte %d); read as Latin-1", path, error.start)
        return raw.decode("latin-1")


def read_grades(
    csv_path: str | Path,
    *,
    patient_column: str = "Sample",
    grade_column: str = "Grade",
    label_map: Mapping[str, int] | None = None,
    grade_aliases: Mapping[str, str] | None = None,
) -> GradeTable:
    """Read ``csv_path`` into a :class:`GradeTable`.

    Tolerates a UTF-8 BOM, UTF-16 with a BOM and Latin-1 text, whitespace around headers and cells, and
    ``,``/``;``/tab delimiters; an Excel workbook is refused with a message saying so. Rows repeating a patient
    with the same grade are merged; rows with different grades mark the patient as conflicting.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"grades CSV not found: {path}")
    text = _table_text(path)
    reader = csv.reader(io.StringIO(text), _sniff_dialect(text[:4096]))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"grades CSV {path} is empty (no header row)")
    fieldnames = [name.strip() for name in header]
    pid_idx = fieldnames.index(_resolve_column(patient_column.strip(), fieldnames, path))
    grade_idx = fieldnames.index(_resolve_column(grade_column.strip(), fieldnames, path))

    table = GradeTable(path=str(path))
    found: dict[str, dict[str, int]] = {}  # patient -> {grade: label}
    problems: dict[str, str] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        table.rows += 1
        raw_pid = row[pid_idx].strip() if pid_idx < len(row) else ""
        if not raw_pid:
            table.rows_without_patient += 1
            continue
        key = normalise_id(raw_pid)
        table.display_ids.setdefault(key, raw_pid)
        raw_grade = row[grade_idx] if grade_idx < len(row) else ""
        grade, label, problem = grade_to_label(raw_grade, label_map, grade_aliases)
        if grade is None:
            problems.setdefault(key, problem)
        else:
            found.setdefault(key, {})[grade] = label  # type: ignore[assignment]

    for key, grades in found.items():
        if len(grades) > 1:
            table.conflicting[key] = sorted(grades)
        else:
            ((grade, label),) = grades.items()
            table.grades[key] = PatientGrade(table.display_ids[key], grade, label)
    for key, problem in problems.items():
        if key not in found:
            table.without_grade[key] = problem
    return table
