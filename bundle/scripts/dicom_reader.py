"""A MONAI ``ImageReader`` for one 2D MR DICOM slice per file.

Why not MONAI's ``PydicomReader``? It applies RescaleSlope/Intercept and decodes RLE, signed pixels and
non-square matrices correctly, but it does NOT invert MONOCHROME1 (so on such files bright would mean *low*
signal), it copies every DICOM tag into the metadata (PatientName, PatientBirthDate, ... would travel with
each batch and could end up in logs or saved outputs), and it only warns and falls back to an identity
affine when ImageOrientationPatient is missing. REMBRANDT slices are plain single-frame files, so a small
reader that does exactly those things right is simpler than configuring around the general one.

Axis convention (same as ``PydicomReader(swap_ij=True)``, the default, and ``ITKReader``): the returned
array is ``pixel_array.T``, i.e. shape ``(Columns, Rows)`` = ``(x, y)``; axis 0 runs along a DICOM row
(left to right on screen), axis 1 down the columns. The affine is built in the same way as PydicomReader
(4x4, LPS converted to RAS), so ``Orientation``/``Spacing``/``Resize`` behave as for MONAI's own readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut

__all__ = ["DicomSliceReader", "DICOM_SUFFIXES"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


class DicomSliceReader(ImageReader):
    """Read single-frame greyscale DICOM slices as float32 ``(x=columns, y=rows)`` arrays.

    Pixel values are modality values (``apply_modality_lut``: slope/intercept applied, signed pixels kept
    signed); MONOCHROME1 is inverted so that bright always means high signal. Metadata hold only
    geometry (``affine``, ``original_affine``, ``spatial_shape``, ``spacing``, ``space``) and
    ``original_channel_dim`` = "no_channel" (NaN); ``filename_or_obj`` is added by ``LoadImage``. No
    identifying tag is ever copied.

    Anything that cannot be decoded raises ``RuntimeError`` (unreadable file) or ``ValueError`` (readable
    but unsupported, e.g. colour or multi-frame) with the file name and the reason in the message.

    Args:
        affine_lps_to_ras: convert the affine from DICOM's LPS to RAS, as MONAI's readers do by default.
    """

    def __init__(self, affine_lps_to_ras: bool = True) -> None:
        super().__init__()
        self.affine_lps_to_ras = affine_lps_to_ras

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """Accept ``.dcm``/``.dicom``/``.ima`` files and suffix-less files that carry the DICM preamble.

        TCIA downloads use ``1-01.dcm``; some exports have no suffix at all, hence the preamble check.
        """
        for name in ensure_tuple(filename):
            path = Path(name)
            if path.suffix.lower() in DICOM_SUFFIXES:
                continue
            if path.suffix == "" and path.is_file() and is_dicom(path):
                continue
            return False
        return True

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> list[tuple[str, pydicom.Dataset]]:
        """Parse each file's header (pixels are decoded later in :meth:`get_data`)."""
        out = []
        for name in ensure_tuple(data):
            try:
                ds = pydicom.dcmread(str(name), **kwargs)
            except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, OSError, ...)
                raise RuntimeError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
            out.append((str(name), ds))
        return out

    def get_data(self, img: list[tuple[str, pydicom.Dataset]] | tuple[str, pydicom.Dataset]) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)`` for one slice; several slices are stacked on a new first (channel) axis."""
        items = [img] if isinstance(img, tuple) else list(img)
        arrays, metas = zip(*(self._one(name, ds) for name, ds in items), strict=True)
        if len(arrays) == 1:
            return arrays[0], metas[0]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack slices of different shapes {sorted(shapes)}: {[n for n, _ in items]}")
        meta = dict(metas[0])
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta

    def _one(self, name: str, ds: pydicom.Dataset) -> tuple[np.ndarray, dict]:
        if "PixelData" not in ds:
            raise RuntimeError(f"{name}: no pixel data (truncated file or not an image)")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"{name}: unsupported PhotometricInterpretation {photometric!r} (need greyscale)")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{name}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not a single slice")
        try:
            raw = ds.pixel_array
        except Exception as exc:  # truncated pixel data, missing decoder, no PixelData element, ...
            raise RuntimeError(f"{name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
        if raw.ndim != 2:
            raise ValueError(f"{name}: expected a 2D slice, got pixel array of shape {raw.shape}")

        pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        if photometric == "MONOCHROME1":
            # Mirror around the stored value range so the inverted image keeps the same intensity range.
            pixels = pixels.max() + pixels.min() - pixels
        data = np.ascontiguousarray(pixels.T)  # (rows, columns) -> (x=columns, y=rows), as MONAI's readers

        affine = self._affine(ds)
        meta: dict[str, Any] = {
            MetaKeys.SPATIAL_SHAPE: np.asarray(data.shape),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),  # "no_channel"
            "spacing": affine_to_spacing(affine, r=2),
        }
        return data, meta

    def _affine(self, ds: pydicom.Dataset) -> np.ndarray:
        """4x4 voxel-to-patient affine for index order (column i, row j), like ``PydicomReader(swap_ij=True)``.

        Missing orientation/position (some old exports) gives an axis-aligned affine with the pixel spacing
        rather than a bare identity, so resampling at least keeps the physical pixel size.
        """
        spacing = ds.get("PixelSpacing") or (1.0, 1.0)
        dr, dc = float(spacing[0]), float(spacing[1])  # row spacing (between rows), column spacing
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient") or (0.0, 0.0, 0.0)
        rx, ry, rz, cx, cy, cz = (float(v) for v in iop) if iop and len(iop) == 6 else (1, 0, 0, 0, 1, 0)
        affine = np.eye(4)
        # Axis 0 = column index i (moves along the row direction), axis 1 = row index j (column direction).
        affine[:3, 0] = np.array([rx, ry, rz]) * dc
        affine[:3, 1] = np.array([cx, cy, cz]) * dr
        affine[:3, 2] = np.cross([rx, ry, rz], [cx, cy, cz])
        affine[:3, 3] = [float(v) for v in ipp]
        if not np.isfinite(affine).all():
            affine = np.diag([dc, dr, 1.0, 1.0])
        return orientation_ras_lps(affine) if self.affine_lps_to_ras else affine
