"""The rules that decide, from one DICOM header, whether a file is a T1-weighted sagittal MR slice to grade.

Pure functions of a parsed header (no file walking, no pools, no reports: those are `scripts.dicom_index`'s).
Orientation comes from ``ImageOrientationPatient``, weighting from TR/TE/TI with the series description as a
fall-back only, post-contrast from ``ContrastBolusAgent`` or the description; every refusal is a skip with one
of the reason codes of `scripts.skip_reasons` and a detail a person can check against the header.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pydicom
from pydicom.uid import UID

from .dicom_headers import header_overrun, int_or_none, number, pixel_problem, text
from .skip_reasons import (
    REASON_LOCALIZER,
    REASON_MULTI_FRAME,
    REASON_NON_IMAGE,
    REASON_NOT_MR,
    REASON_NOT_SAGITTAL,
    REASON_NOT_T1_FLAIR,
    REASON_NOT_T1_PD,
    REASON_NOT_T1_T2,
    REASON_NOT_T1_UNKNOWN,
    REASON_POST_CONTRAST,
    REASON_TRUNCATED,
    REASON_UNREADABLE,
)

__all__ = ["FLAIR_MIN_TI", "IR_T1_MAX_TE", "IR_T1_MAX_TI", "T1_MAX_TE", "T1_MAX_TR", "classify_header", "skip_outcome"]

_NOT_T1_REASONS = {"T2": REASON_NOT_T1_T2, "FLAIR": REASON_NOT_T1_FLAIR, "PD": REASON_NOT_T1_PD}

# Thresholds of the T1 rule (milliseconds).
T1_MAX_TR = 1000.0
T1_MAX_TE = 30.0
IR_T1_MAX_TE = 10.0
IR_T1_MAX_TI = 1300.0
FLAIR_MIN_TI = 1500.0

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)
_MR_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"})
# SR documents, presentation states, encapsulated documents, raw data, spectroscopy: never images.
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.4.2",
)

_TOKEN_RE = re.compile(r"[A-Z0-9]+")
_T1_TOKEN_RE = re.compile(r"(?:SAG|AX|COR|3D)?T1(?:W|WI|SE|FSE|TSE|3D|FLAIR|MPR)?|MP?RAGE|F?SPGR|BRAVO|T1FFE|TFE")
_T2_TOKEN_RE = re.compile(r"(?:SAG|AX|COR|3D)?T2(?:W|WI|SE|FSE|TSE|STAR|3D)?")
_PD_TOKEN_RE = re.compile(r"(?:SAG|AX|COR)?PDW?I?|PROTON")
_LOCALIZER_TOKENS = frozenset({"LOC", "LOCALIZER", "LOCALISER", "LOCATOR", "SCOUT", "SURVEY", "PILOT", "TRIPILOT"})
_CONTRAST_TOKENS = frozenset({"POST", "GAD", "GD", "GADO", "GADOLINIUM", "CONTRAST", "POSTCONTRAST", "POSTGAD"})
_NO_CONTRAST_TOKENS = frozenset({"PRE", "PRECONTRAST", "WITHOUT", "WO", "NONCONTRAST", "NC"})


def _fmt(value: float) -> str:
    return f"{value:g}"


def _is_localizer(ds: pydicom.Dataset, description: str, tokens: set[str]) -> str:
    image_type = {part.strip().upper() for part in text(ds, "ImageType").split("\\")}
    if "LOCALIZER" in image_type:
        return "ImageType contains LOCALIZER"
    if (
        tokens & _LOCALIZER_TOKENS
        or re.search(r"3\s*-?\s*PLANE", description)
        or any(t.startswith("SCOUT") or t.endswith("SCOUT") for t in tokens)
    ):
        return "SeriesDescription names a localizer/scout"
    return ""


def _plane(ds: pydicom.Dataset, tokens: set[str]) -> tuple[bool, str]:
    """Sagittal when the slice normal (row x column direction cosines) is closest to the patient x axis."""
    try:
        cosines = [float(v) for v in text(ds, "ImageOrientationPatient").split("\\")]
    except ValueError:
        cosines = []
    if len(cosines) == 6 and all(math.isfinite(v) for v in cosines):
        (rx, ry, rz), (cx, cy, cz) = cosines[:3], cosines[3:]
        normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
        magnitudes = [abs(v) for v in normal]
        if max(magnitudes) > 0:
            axis = magnitudes.index(max(magnitudes))
            shown = ", ".join(f"{v:.3f}" for v in normal)
            if axis == 0:
                return True, f"slice normal ({shown}) closest to x"
            return False, f"slice normal ({shown}) closest to {'xyz'[axis]}: {('coronal', 'axial')[axis - 1]}"
    if any(t.startswith("SAG") for t in tokens):
        return True, "no usable ImageOrientationPatient; SeriesDescription says sagittal"
    return False, "no usable ImageOrientationPatient and no SAG/SAGITTAL in SeriesDescription"


def _weighting(ds: pydicom.Dataset, tokens: set[str]) -> tuple[str, str]:
    """Return ("T1" | "T2" | "FLAIR" | "PD" | "unknown", why) from TR/TE/TI, else the series description."""
    tr, te, ti = number(ds, "RepetitionTime"), number(ds, "EchoTime"), number(ds, "InversionTime")
    desc_t1 = any(_T1_TOKEN_RE.fullmatch(t) for t in tokens)
    desc_flair = any("FLAIR" in t for t in tokens)
    if ti is not None and ti > FLAIR_MIN_TI:
        return "FLAIR", f"InversionTime {_fmt(ti)} ms > {_fmt(FLAIR_MIN_TI)} ms"
    if desc_flair and not desc_t1:
        return "FLAIR", "SeriesDescription contains FLAIR"
    if tr is not None and te is not None:
        timing = f"TR {_fmt(tr)} ms, TE {_fmt(te)} ms"
        if ti is not None and 0 < ti < IR_T1_MAX_TI and te < IR_T1_MAX_TE:
            return "T1", f"inversion-prepared T1 ({timing}, TI {_fmt(ti)} ms)"
        if tr < T1_MAX_TR and te < T1_MAX_TE:
            return "T1", f"short TR/short TE ({timing})"
        if te >= T1_MAX_TE:
            return "T2", f"long TE ({timing})"
        if desc_t1:
            return "T1", f"long TR/short TE ({timing}) but SeriesDescription names a T1 sequence"
        return "PD", f"long TR/short TE ({timing})"
    if desc_t1:
        return "T1", "no TR/TE; SeriesDescription names a T1 sequence"
    if any(_T2_TOKEN_RE.fullmatch(t) for t in tokens):
        return "T2", "no TR/TE; SeriesDescription names a T2 sequence"
    if any(_PD_TOKEN_RE.fullmatch(t) for t in tokens):
        return "PD", "no TR/TE; SeriesDescription names a PD sequence"
    return "unknown", "no TR/TE and no weighting in SeriesDescription"


def _post_contrast(ds: pydicom.Dataset, description: str, tokens: set[str]) -> str:
    if text(ds, "ContrastBolusAgent"):
        return "ContrastBolusAgent present"
    if tokens & _NO_CONTRAST_TOKENS or "W/O" in description:
        return ""
    if "+C" in description or "C+" in description or "+ C" in description or tokens & _CONTRAST_TOKENS:
        return "SeriesDescription marks post-contrast"
    return ""


def skip_outcome(path: str, reason: str, detail: str) -> dict[str, str]:
    """A skip record: the file, its reason code and the detail."""
    return {"path": path, "reason": reason, "detail": detail}


def classify_header(
    path: str, ds: pydicom.Dataset, tsyntax: str, fh: Any, file_size: int, include_post_contrast: bool
) -> dict[str, Any]:
    """The slice record of a T1-weighted sagittal MR slice, else a :func:`skip_outcome` saying why not.

    ``ds`` is the header (pixel data deferred), ``fh`` the open file it came from, whose pixel data length is
    checked against Rows x Columns x bits (`scripts.dicom_headers.pixel_problem`) without decoding it.
    """
    sop_class = text(ds, "SOPClassUID")
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if elem is None and not any(tag in ds for tag in _FLOAT_PIXEL_TAGS):
        if not sop_class and "Modality" not in ds:
            return skip_outcome(path, REASON_UNREADABLE, "no DICOM header could be parsed (corrupt or truncated file)")
        overrun = header_overrun(ds, file_size)
        if overrun:
            return skip_outcome(
                path, REASON_TRUNCATED, f"file ends {overrun} bytes inside its header, before any pixel data"
            )
        return skip_outcome(path, REASON_NON_IMAGE, f"no pixel data ({sop_name})")
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        return skip_outcome(path, REASON_NON_IMAGE, f"non-image SOP class ({sop_name})")
    modality = text(ds, "Modality").upper()
    if modality != "MR" and not (not modality and sop_class in _MR_SOP_CLASSES):
        return skip_outcome(path, REASON_NOT_MR, f"Modality {modality or 'missing'} ({sop_name})")
    frames = int_or_none(ds, "NumberOfFrames") or 1
    if frames > 1:
        return skip_outcome(
            path, REASON_MULTI_FRAME, f"{frames} frames in one file ({sop_name}); not split into slices"
        )
    if elem is not None:
        problem = pixel_problem(ds, UID(tsyntax), elem, fh, file_size)
        if problem:
            return skip_outcome(path, *problem)

    description = text(ds, "SeriesDescription")
    upper = description.upper()
    tokens = set(_TOKEN_RE.findall(upper))
    localizer = _is_localizer(ds, upper, tokens)
    if localizer:
        return skip_outcome(path, REASON_LOCALIZER, localizer)
    sagittal, why = _plane(ds, tokens)
    if not sagittal:
        return skip_outcome(path, REASON_NOT_SAGITTAL, why)
    weighting, why = _weighting(ds, tokens)
    if weighting != "T1":
        return skip_outcome(path, _NOT_T1_REASONS.get(weighting, REASON_NOT_T1_UNKNOWN), f"{weighting}: {why}")
    contrast = _post_contrast(ds, upper, tokens)
    if contrast and not include_post_contrast:
        return skip_outcome(path, REASON_POST_CONTRAST, contrast)
    return {
        "image": path,
        "patient_id": text(ds, "PatientID"),
        "study_uid": text(ds, "StudyInstanceUID"),
        "series_uid": text(ds, "SeriesInstanceUID"),
        "sop_instance_uid": text(ds, "SOPInstanceUID"),
        "instance_number": int_or_none(ds, "InstanceNumber"),
        "series_number": int_or_none(ds, "SeriesNumber"),
        "series_description": description,
        "rows": int_or_none(ds, "Rows"),
        "columns": int_or_none(ds, "Columns"),
        "post_contrast": bool(contrast),
    }
