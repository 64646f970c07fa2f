"""Fast DICOM header reading and pixel-data integrity checks for the indexer.

Indexing is bound by header parsing, so this module reads as little as possible, as cheaply as possible:
the Part 10 file meta group is parsed directly instead of through ``dcmread`` (which spends most of its time
building and validating it), values longer than ``DEFER_SIZE`` (pixel data, private headers) are deferred
and never read, and the few tags the selection rules need are decoded from their raw bytes. Pixel data is
never decoded: its integrity is checked from element lengths against the image geometry and the file size,
and, for compressed transfer syntaxes, from the presence of a decoder and the codec marker of the first
encapsulated fragment. Anything unusual (no meta group, odd VRs, deflate, private syntaxes, files without
the DICM marker) falls back to ``pydicom.dcmread``.
"""

from __future__ import annotations

import io
import math
import os
import struct
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

from .skip_reasons import REASON_TRUNCATED, REASON_UNDECODABLE

# Values longer than this are not read (pixel data, private CSA headers): only their length and offset are kept.
DEFER_SIZE = 1024

_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQ_DELIM_TAG = b"\xfe\xff\xdd\xe0"

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


def text(ds: pydicom.Dataset, keyword: str) -> str:
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


def number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """First value of a numeric element (DS/IS/US) as float; None when absent, malformed or not finite."""
    try:
        if keyword in _US_KEYWORDS:
            raw, elem = _raw_bytes(ds, keyword)
            if raw is not None and len(raw) >= 2:
                return float(struct.unpack("<H" if elem.is_little_endian else ">H", raw[:2])[0])
            value = ds[_tag(keyword)].value if elem is not None else None
            return float(value) if value not in (None, "") else None
        first = text(ds, keyword).split("\\")[0].strip()
        value = float(first) if first else None
    except Exception:
        return None
    return value if value is not None and math.isfinite(value) else None


def int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = number(ds, keyword)
    return int(value) if value is not None else None


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


def pixel_problem(ds: pydicom.Dataset, tsyntax: UID, elem: Any, fh: Any, file_size: int) -> tuple[str, str] | None:
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
    rows, columns = int_or_none(ds, "Rows") or 0, int_or_none(ds, "Columns") or 0
    bits = int_or_none(ds, "BitsAllocated") or 0
    samples = int_or_none(ds, "SamplesPerPixel") or 1
    frames = int_or_none(ds, "NumberOfFrames") or 1
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


def header_overrun(ds: pydicom.Dataset, file_size: int) -> int:
    """How far the last top-level element claims to extend past the end of the file (0 when it fits)."""
    end = 0
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
            end = max(end, elem.value_tell + elem.length)
    return max(0, end - file_size)


# --- fast header reader --------------------------------------------------------------------------------------
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


def read_header(fh: Any) -> tuple[pydicom.Dataset, str]:
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
    tsyntax = text(meta, "TransferSyntaxUID") if meta is not None else ""
    return ds, tsyntax or ImplicitVRLittleEndian
