"""Write MR DICOM slices with the headers a scanner writes, for the demo dataset and the tests.

One function, :func:`write_mr_slice`, turns a 2D pixel array and a few acquisition facts (orientation,
TR/TE, series description) into a valid MR Image Storage file. The demo tree and every test that needs a
DICOM edge case (MONOCHROME1, signed pixels, RLE, a localizer, a truncated file) are built on it, so the
indexer is always tested against files of one consistent, realistic shape.

Synthetic files carry a fake patient name and birth date on purpose: tests check that such identifying
tags never leak into the datalist, the report or the logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

# Direction cosines (row, column) of ImageOrientationPatient for the three standard planes.
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

ORIGINAL_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "M", "ND")
LOCALIZER_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "LOCALIZER")


def write_mr_slice(
    path: str | Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    series_number: int = 1,
    instance_number: int = 1,
    series_description: str = "SAG T1",
    orientation: Sequence[float] | None = SAGITTAL,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_thickness: float = 5.0,
    repetition_time: float | None = 500.0,
    echo_time: float | None = 15.0,
    image_type: Sequence[str] = ORIGINAL_IMAGE_TYPE,
    photometric: str = "MONOCHROME2",
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    contrast_agent: str | None = None,
    sop_instance_uid: str | None = None,
    compress_rle: bool = False,
    patient_name: str = "Synthetic^Patient",
    patient_birth_date: str = "19700101",
) -> Path:
    """Write ``pixels`` (2D, uint16 or int16) as one MR slice and return the file's path.

    ``orientation=None`` leaves ImageOrientationPatient out (some old exports do), ``repetition_time=None``
    and ``echo_time=None`` leave TR/TE out, so the indexer's fall-back rules can be tested.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2D, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"pixels must be uint16 or int16, got {pixels.dtype}")
    sop_instance_uid = sop_instance_uid or generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = "MR"
    ds.Manufacturer = "SYNTHETIC"
    ds.MagneticFieldStrength = 1.5
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20050101"
    ds.StudyDescription = "MRI BRAIN W/WO CONTRAST"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.MRAcquisitionType = "2D"
    if repetition_time is not None:
        ds.RepetitionTime = repetition_time
    if echo_time is not None:
        ds.EchoTime = echo_time
    if contrast_agent:
        ds.ContrastBolusAgent = contrast_agent
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = slice_thickness

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = 1.0 if rescale_slope is None else rescale_slope
        ds.RescaleIntercept = 0.0 if rescale_intercept is None else rescale_intercept
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if compress_rle:
        ds.compress(RLELossless, encoding_plugin="pydicom")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
