"""Index a TCIA DICOM download, keep the T1-weighted sagittal MR slices and join them to the clinical grades.

TCIA's downloader writes ``<root>/<PatientID>/<study>/<series>/*.dcm``, but real trees also hold localizers,
T2/FLAIR/PD series, axial and coronal planes, structured reports, the odd truncated transfer and files without
a ``.dcm`` suffix. Training on the wrong slices silently ruins the model, so every file is either *selected* or
*skipped with a machine-readable reason* (the ``REASON_*`` constants, explained in ``REASON_DESCRIPTIONS``) and
nothing is dropped unreported. Hidden files and folders (``.DS_Store``, ``.git``) are not candidates.
One bad file never stops the index: any exception while reading a file becomes a skip reason.

Speed: only headers are parsed (pixel data is deferred, never decoded). Pixel integrity is checked from the
element lengths and the file size, and, for compressed transfer syntaxes, from the presence of a decoder and
of an encapsulated fragment with the right codec marker. Files are inspected in a process pool over chunks of
paths, because pydicom's parser is pure Python and CPU bound (~2,000 headers/s per process).

Privacy: outputs carry PatientID, UIDs, paths and acquisition facts only; PatientName, PatientBirthDate and
other identifying tags are never copied into records, reports, CSVs or log lines.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import struct
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import pydicom
import pydicom.datadict
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from .grades import normalise_id, read_grades

logger = logging.getLogger(__name__)

# --- skip reasons (machine-readable codes; the human text goes in "detail") ----------------------------------
REASON_NOT_DICOM = "not_dicom"
REASON_UNREADABLE = "unreadable"
REASON_NON_IMAGE = "non_image"
REASON_NOT_MR = "not_mr"
REASON_LOCALIZER = "localizer"
REASON_NOT_SAGITTAL = "not_sagittal"
REASON_NOT_T1_T2 = "not_t1_t2"
REASON_NOT_T1_FLAIR = "not_t1_flair"
REASON_NOT_T1_PD = "not_t1_pd"
REASON_NOT_T1_UNKNOWN = "not_t1_unknown"
REASON_POST_CONTRAST = "post_contrast_excluded"
REASON_DUPLICATE = "duplicate_sop_instance"
REASON_TRUNCATED = "pixel_data_truncated"
REASON_UNDECODABLE = "pixel_data_undecodable"

_NOT_T1_REASONS = {"T2": REASON_NOT_T1_T2, "FLAIR": REASON_NOT_T1_FLAIR, "PD": REASON_NOT_T1_PD}

REASON_DESCRIPTIONS: dict[str, str] = {
    REASON_NOT_DICOM: "not a DICOM file",
    REASON_UNREADABLE: "unreadable file (the detail holds the error)",
    REASON_NON_IMAGE: "non-image object: no pixel data, or an SR / presentation state / other non-image SOP class",
    REASON_NOT_MR: "not an MR image",
    REASON_LOCALIZER: "localizer / scout image",
    REASON_NOT_SAGITTAL: "not a sagittal slice",
    REASON_NOT_T1_T2: "not T1-weighted: T2-weighted",
    REASON_NOT_T1_FLAIR: "not T1-weighted: FLAIR",
    REASON_NOT_T1_PD: "not T1-weighted: proton density",
    REASON_NOT_T1_UNKNOWN: "not T1-weighted: weighting unknown (no TR/TE and no hint in the description)",
    REASON_POST_CONTRAST: "post-contrast T1, excluded by include_post_contrast=False",
    REASON_DUPLICATE: "duplicate SOPInstanceUID (the first file by path is kept)",
    REASON_TRUNCATED: "truncated file: pixel data shorter than the header says",
    REASON_UNDECODABLE: "pixel data cannot be decoded (no decoder for its transfer syntax, or corrupt stream)",
}

# --- tunables --------------------------------------------------------------------------------------------------
# Values longer than this are not read (pixel data, private CSA headers): only their length and offset are kept.
DEFER_SIZE = 1024
# Below this many files a process pool costs more (start-up, pickling) than it saves.
MIN_FILES_FOR_POOL = 400
# Suffixes that are certainly not DICOM: reported without opening the file.
NON_DICOM_SUFFIXES = frozenset(
    {".csv", ".json", ".txt", ".md", ".xml", ".html", ".htm", ".pdf", ".zip", ".gz", ".tgz", ".tar", ".7z",
     ".py", ".log", ".xls", ".xlsx", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nrrd", ".mha"}
)  # fmt: skip

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

_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQ_DELIM_TAG = b"\xfe\xff\xdd\xe0"

_TOKEN_RE = re.compile(r"[A-Z0-9]+")
_T1_TOKEN_RE = re.compile(r"(?:SAG|AX|COR|3D)?T1(?:W|WI|SE|FSE|TSE|3D|FLAIR|MPR)?|MP?RAGE|F?SPGR|BRAVO|T1FFE|TFE")
_T2_TOKEN_RE = re.compile(r"(?:SAG|AX|COR|3D)?T2(?:W|WI|SE|FSE|TSE|STAR|3D)?")
_PD_TOKEN_RE = re.compile(r"(?:SAG|AX|COR)?PDW?I?|PROTON")
_LOCALIZER_TOKENS = frozenset({"LOC", "LOCALIZER", "LOCALISER", "LOCATOR", "SCOUT", "SURVEY", "PILOT", "TRIPILOT"})
_CONTRAST_TOKENS = frozenset({"POST", "GAD", "GD", "GADO", "GADOLINIUM", "CONTRAST", "POSTCONTRAST", "POSTGAD"})
_NO_CONTRAST_TOKENS = frozenset({"PRE", "PRECONTRAST", "WITHOUT", "WO", "NONCONTRAST", "NC"})


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


# --- header helpers -----------------------------------------------------------------------------------------
_US_KEYWORDS = frozenset({"Rows", "Columns", "BitsAllocated", "SamplesPerPixel"})
_TAGS: dict[str, int] = {}


def _tag(keyword: str) -> int:
    if keyword not in _TAGS:
        _TAGS[keyword] = int(pydicom.datadict.tag_for_keyword(keyword))
    return _TAGS[keyword]


def _raw_bytes(ds: pydicom.Dataset, keyword: str) -> tuple[bytes | None, Any]:
    """The undecoded value of an element, when pydicom still holds it raw (the common, fast case).

    pydicom's value conversion (DS/IS objects, validation) costs more than parsing the file; decoding the few
    tags we need ourselves doubles the indexing rate.
    """
    tag = _TAGS.get(keyword) or _tag(keyword)
    # Dataset._dict is pydicom's element store (stable since 1.x); a plain dict lookup is 3x cheaper than
    # get_item's tag normalisation. Fall back to the public call if a future pydicom renames it.
    store = getattr(ds, "_dict", None)
    elem = store.get(tag) if isinstance(store, dict) else ds.get_item(tag, keep_deferred=True)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        return elem.value, elem
    return None, elem


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """Element value as stripped text; multiple values joined by a backslash; "" when absent or malformed."""
    try:
        raw, elem = _raw_bytes(ds, keyword)
        if raw is not None:
            return raw.decode("utf-8", "replace").strip(" \0")
        if elem is None:
            return ""
        value = ds[_tag(keyword)].value
    except Exception:  # malformed value: treat as absent rather than losing the file
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """First value of a numeric element (DS/IS/US) as float; None when absent, malformed or not finite."""
    try:
        if keyword in _US_KEYWORDS:
            raw, elem = _raw_bytes(ds, keyword)
            if raw is not None and len(raw) >= 2:
                return float(struct.unpack("<H" if elem.is_little_endian else ">H", raw[:2])[0])
            value = ds[_tag(keyword)].value if elem is not None else None
            return float(value) if value not in (None, "") else None
        text = _text(ds, keyword).split("\\")[0].strip()
        number = float(text) if text else None
    except Exception:
        return None
    return number if number is not None and math.isfinite(number) else None


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    number = _number(ds, keyword)
    return int(number) if number is not None else None


def _fmt(value: float) -> str:
    return f"{value:g}"


# --- selection rules ----------------------------------------------------------------------------------------
def _is_localizer(ds: pydicom.Dataset, description: str, tokens: set[str]) -> str:
    image_type = {part.strip().upper() for part in _text(ds, "ImageType").split("\\")}
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
        cosines = [float(v) for v in _text(ds, "ImageOrientationPatient").split("\\")]
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
    tr, te, ti = _number(ds, "RepetitionTime"), _number(ds, "EchoTime"), _number(ds, "InversionTime")
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
    if _text(ds, "ContrastBolusAgent"):
        return "ContrastBolusAgent present"
    if tokens & _NO_CONTRAST_TOKENS or "W/O" in description:
        return ""
    if "+C" in description or "C+" in description or "+ C" in description or tokens & _CONTRAST_TOKENS:
        return "SeriesDescription marks post-contrast"
    return ""


# --- pixel data integrity -----------------------------------------------------------------------------------
_DECODER_CACHE: dict[str, bool] = {}


def decoder_available(transfer_syntax: str) -> bool:
    """Whether pydicom can decode ``transfer_syntax`` here (cached per process: plugin probing is slow)."""
    if transfer_syntax not in _DECODER_CACHE:
        try:
            from pydicom.pixels import get_decoder

            _DECODER_CACHE[transfer_syntax] = bool(get_decoder(UID(transfer_syntax)).is_available)
        except Exception:
            _DECODER_CACHE[transfer_syntax] = False
    return _DECODER_CACHE[transfer_syntax]


def _codec_marker_ok(tsyntax: UID, fragment: bytes) -> bool:
    """Cheap sanity check of the first fragment: does it start like the codec's bit stream?"""
    if tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
        return fragment.startswith(b"\xff\xd8")
    if tsyntax in JPEG2000TransferSyntaxes:
        return fragment.startswith(b"\xff\x4f\xff\x51") or fragment[4:8] == b"jP  "
    if tsyntax == RLELossless:
        return len(fragment) == 64 and 1 <= struct.unpack("<I", fragment[:4])[0] <= 15
    return len(fragment) > 0


def _first_fragment(elem: Any, fh: Any) -> tuple[str, bytes]:
    """Read the start of the first encapsulated fragment; returns (problem, its first bytes)."""
    value = getattr(elem, "value", None)
    if value is not None:
        stream: Any = io.BytesIO(bytes(value))
    else:
        stream = fh
        stream.seek(elem.value_tell)
    header = stream.read(8)
    if len(header) < 8 or header[:4] != _ITEM_TAG:
        return "encapsulated pixel data does not start with a Basic Offset Table item", b""
    stream.seek(struct.unpack("<I", header[4:])[0], os.SEEK_CUR)
    header = stream.read(8)
    if len(header) < 8 or header[:4] == _SEQ_DELIM_TAG:
        return "encapsulated pixel data holds no fragment", b""
    if header[:4] != _ITEM_TAG:
        return "encapsulated pixel data is malformed (no fragment item after the offset table)", b""
    wanted = min(struct.unpack("<I", header[4:])[0], 64)
    fragment = stream.read(wanted)
    if wanted == 0 or len(fragment) < wanted:
        return "first encapsulated fragment is empty or cut short", b""
    return "", fragment


def _pixel_problem(ds: pydicom.Dataset, tsyntax: UID, elem: Any, fh: Any, file_size: int) -> tuple[str, str] | None:
    """Check pixel data without decoding it: (reason, detail) when it cannot be used, else None."""
    if tsyntax.is_encapsulated:
        if not decoder_available(tsyntax):
            return REASON_UNDECODABLE, f"no pixel data decoder available for {tsyntax.name}"
        problem, fragment = _first_fragment(elem, fh)
        if problem:
            return REASON_UNDECODABLE, problem
        if not _codec_marker_ok(tsyntax, fragment):
            return REASON_UNDECODABLE, f"first fragment is not a valid {tsyntax.name} bit stream"
        return None
    rows, columns = _int_or_none(ds, "Rows") or 0, _int_or_none(ds, "Columns") or 0
    bits = _int_or_none(ds, "BitsAllocated") or 0
    samples = _int_or_none(ds, "SamplesPerPixel") or 1
    frames = _int_or_none(ds, "NumberOfFrames") or 1
    if rows <= 0 or columns <= 0 or bits <= 0:
        return REASON_UNDECODABLE, "Rows, Columns or BitsAllocated missing or zero"
    expected = math.ceil(rows * columns * samples * frames * bits / 8)
    value = getattr(elem, "value", None)
    length = len(value) if value is not None else int(elem.length)
    if length == 0xFFFFFFFF:
        return REASON_UNDECODABLE, f"native pixel data with undefined length under {tsyntax.name}"
    if length < expected:
        return REASON_TRUNCATED, f"PixelData holds {length} bytes, header implies {expected}"
    if value is None and tsyntax != DeflatedExplicitVRLittleEndian and elem.value_tell + length > file_size:
        missing = elem.value_tell + length - file_size
        return REASON_TRUNCATED, f"file ends {missing} bytes before the end of PixelData"
    return None


def _header_overrun(ds: pydicom.Dataset, file_size: int) -> int:
    """How far the last top-level element claims to extend past the end of the file (0 when it fits)."""
    end = 0
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
            end = max(end, elem.value_tell + elem.length)
    return max(0, end - file_size)


# --- per-file inspection (runs in worker processes) -----------------------------------------------------------
def _skip(path: str, reason: str, detail: str) -> dict[str, str]:
    return {"path": path, "reason": reason, "detail": detail}


_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_NATIVE_SYNTAXES = {
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRLittleEndian: (False, True),
    ExplicitVRBigEndian: (False, False),
}


def _dataset_encoding(tsyntax: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of the data set for ``tsyntax``; None when pydicom must handle it."""
    if tsyntax in _NATIVE_SYNTAXES:
        return _NATIVE_SYNTAXES[tsyntax]
    if tsyntax in AllTransferSyntaxes and tsyntax != DeflatedExplicitVRLittleEndian and UID(tsyntax).is_encapsulated:
        return False, True
    return None


def _read_fast(fh: Any) -> tuple[pydicom.Dataset, str] | None:
    """Parse the file meta group by hand, then the data set with pydicom's ``read_dataset``.

    ``dcmread`` spends two thirds of its time building and validating the file meta data set; for a
    conformant Part 10 file the group is a handful of explicit-VR little-endian elements, read here in
    microseconds. Anything unusual (no meta group, odd VRs, deflate, private syntaxes) returns None so the
    caller falls back to ``dcmread``.
    """
    fh.seek(132)
    tsyntax = ""
    while True:
        header = fh.read(8)
        if len(header) < 8:
            return None
        group, element = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            fh.seek(-8, os.SEEK_CUR)
            break
        vr = header[4:6]
        if not (vr.isalpha() and vr.isupper()):
            return None
        if vr in _LONG_LENGTH_VRS:
            length = struct.unpack("<I", fh.read(4))[0]
        else:
            length = struct.unpack("<H", header[6:8])[0]
        value = fh.read(length)
        if element == 0x0010:
            tsyntax = value.decode("ascii", "replace").strip("\0 ")
    encoding = _dataset_encoding(tsyntax)
    if encoding is None:
        return None
    peek = fh.read(6)
    fh.seek(-len(peek), os.SEEK_CUR)
    looks_explicit = len(peek) == 6 and peek[4:6].isalpha() and peek[4:6].isupper()
    if looks_explicit == encoding[0]:  # VR encoding contradicts the transfer syntax: let dcmread sort it out
        return None
    return read_dataset(fh, encoding[0], encoding[1], defer_size=DEFER_SIZE), tsyntax


def _read(fh: Any) -> tuple[pydicom.Dataset, str]:
    """Parse a header and return it with its transfer syntax.

    Files without the 128-byte preamble + DICM are retried leniently (old exports) and accepted only when
    they hold a recognisable DICOM header.
    """
    head = fh.read(132)
    if head[128:132] == b"DICM":
        try:
            fast = _read_fast(fh)
        except Exception:
            fast = None
        if fast is not None:
            return fast
        fh.seek(0)
        ds = pydicom.dcmread(fh, defer_size=DEFER_SIZE)
    else:
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, defer_size=DEFER_SIZE, force=True)
        except Exception as exc:  # without the DICM marker, a parse failure just means "some other file"
            raise pydicom.errors.InvalidDicomError("no DICM marker and no parsable DICOM header") from exc
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise pydicom.errors.InvalidDicomError("no DICM marker and no DICOM header")
    meta = getattr(ds, "file_meta", None)
    tsyntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    return ds, tsyntax or ImplicitVRLittleEndian


def inspect_file(path: str, include_post_contrast: bool = True) -> dict[str, Any]:
    """Classify one file: a slice record ``{"kind": "slice", ...}`` or a skip ``{"kind": "skip", ...}``.

    Never raises: any exception while reading becomes ``REASON_UNREADABLE`` with the exception text.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in NON_DICOM_SUFFIXES:
        return {"kind": "skip", **_skip(path, REASON_NOT_DICOM, f"not a DICOM file ({suffix} file)")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as fh:
                file_size = os.fstat(fh.fileno()).st_size
                try:
                    ds, tsyntax = _read(fh)
                except pydicom.errors.InvalidDicomError as exc:
                    return {"kind": "skip", **_skip(path, REASON_NOT_DICOM, f"not a DICOM file ({exc})")}
                outcome = _classify(path, ds, tsyntax, fh, file_size, include_post_contrast)
    except Exception as exc:  # one bad file must never stop the index
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        outcome = _skip(path, REASON_UNREADABLE, text)
    if "reason" in outcome:
        return {"kind": "skip", **outcome}
    return {"kind": "slice", **outcome}


def _classify(
    path: str, ds: pydicom.Dataset, tsyntax: str, fh: Any, file_size: int, include_post_contrast: bool
) -> dict[str, Any]:
    sop_class = _text(ds, "SOPClassUID")
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if elem is None and not any(tag in ds for tag in _FLOAT_PIXEL_TAGS):
        if not sop_class and "Modality" not in ds:
            return _skip(path, REASON_UNREADABLE, "no DICOM header could be parsed (corrupt or truncated file)")
        overrun = _header_overrun(ds, file_size)
        if overrun:
            return _skip(path, REASON_TRUNCATED, f"file ends {overrun} bytes inside its header, before any pixel data")
        return _skip(path, REASON_NON_IMAGE, f"no pixel data ({sop_name})")
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        return _skip(path, REASON_NON_IMAGE, f"non-image SOP class ({sop_name})")
    modality = _text(ds, "Modality").upper()
    if modality != "MR" and not (not modality and sop_class in _MR_SOP_CLASSES):
        return _skip(path, REASON_NOT_MR, f"Modality {modality or 'missing'} ({sop_name})")
    if elem is not None:
        problem = _pixel_problem(ds, UID(tsyntax), elem, fh, file_size)
        if problem:
            return _skip(path, *problem)

    description = _text(ds, "SeriesDescription")
    upper = description.upper()
    tokens = set(_TOKEN_RE.findall(upper))
    localizer = _is_localizer(ds, upper, tokens)
    if localizer:
        return _skip(path, REASON_LOCALIZER, localizer)
    sagittal, why = _plane(ds, tokens)
    if not sagittal:
        return _skip(path, REASON_NOT_SAGITTAL, why)
    weighting, why = _weighting(ds, tokens)
    if weighting != "T1":
        return _skip(path, _NOT_T1_REASONS.get(weighting, REASON_NOT_T1_UNKNOWN), f"{weighting}: {why}")
    contrast = _post_contrast(ds, upper, tokens)
    if contrast and not include_post_contrast:
        return _skip(path, REASON_POST_CONTRAST, contrast)
    return {
        "image": path,
        "patient_id": _text(ds, "PatientID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "instance_number": _int_or_none(ds, "InstanceNumber"),
        "series_number": _int_or_none(ds, "SeriesNumber"),
        "series_description": description,
        "rows": _int_or_none(ds, "Rows"),
        "columns": _int_or_none(ds, "Columns"),
        "post_contrast": bool(contrast),
    }


def _inspect_chunk(paths: Sequence[str], include_post_contrast: bool) -> list[dict[str, Any]]:
    return [inspect_file(path, include_post_contrast) for path in paths]


# --- tree walking and the pool ------------------------------------------------------------------------------
def _candidate_files(root: Path) -> list[str]:
    """Every non-hidden file under ``root`` (hidden directories are pruned), absolute and sorted."""
    if root.is_file():
        return [str(root.resolve())]
    found = []
    for dirpath, dirnames, filenames in os.walk(root.resolve()):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, name) for name in filenames if not name.startswith("."))
    return sorted(found)


def _inspect_all(paths: list[str], include_post_contrast: bool, workers: int | None) -> list[dict[str, Any]]:
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
        return _inspect_chunk(paths, include_post_contrast)
    # Several chunks per worker balance uneven files; each chunk is big enough to amortise pickling.
    size = max(32, min(1000, math.ceil(len(paths) / (workers * 6))))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            results: list[dict[str, Any]] = []
            for part in pool.map(_inspect_chunk, chunks, repeat(include_post_contrast)):
                results.extend(part)
            return results
    except (BrokenProcessPool, OSError, AssertionError) as exc:  # e.g. no fork allowed, daemonic parent
        logger.warning("process pool unavailable (%s); indexing in-process", type(exc).__name__)
        return _inspect_chunk(paths, include_post_contrast)


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


def index_dicom_tree(
    root: str | Path, *, include_post_contrast: bool = True, workers: int | None = None
) -> IndexResult:
    """Index every candidate file under ``root`` (a tree, a series folder or one file).

    Returns selected T1-weighted sagittal MR slices and the skipped files with reasons. An empty selection
    is not an error here (callers decide); a missing ``root`` raises ``FileNotFoundError``.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"DICOM root not found: {root_path}")
    resolved = root_path.resolve()
    paths = _candidate_files(resolved)
    outcomes = _inspect_all(paths, include_post_contrast, workers)

    result = IndexResult(root=str(resolved), files_scanned=len(paths))
    kept_by_uid: dict[str, str] = {}
    for outcome in outcomes:  # in sorted path order, so the first file of a duplicate set is kept
        kind = outcome.pop("kind")
        if kind == "skip":
            result.skipped.append(outcome)
            continue
        uid = outcome["sop_instance_uid"]
        if uid and uid in kept_by_uid:
            detail = f"same SOPInstanceUID as kept file {kept_by_uid[uid]}"
            result.skipped.append(_skip(outcome["image"], REASON_DUPLICATE, detail))
            continue
        if uid:
            kept_by_uid[uid] = outcome["image"]
        if not outcome["patient_id"]:
            outcome["patient_id"] = _patient_from_path(outcome["image"], resolved if resolved.is_dir() else resolved)
        result.slices.append(outcome)
    result.slices.sort(key=_slice_sort_key)
    result.skipped.sort(key=lambda item: item["path"])
    return result


def select_t1_sagittal(
    input_path: str | Path, *, include_post_contrast: bool = True, workers: int | None = None
) -> IndexResult:
    """Selection for inference: one DICOM file, a series folder or a whole tree; no grades involved."""
    return index_dicom_tree(input_path, include_post_contrast=include_post_contrast, workers=workers)


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
    report_path.write_text(render_report(report), encoding="utf-8")
    write_skipped_csv(report["skipped"], skipped_path)
    if not records:
        raise RuntimeError(
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
