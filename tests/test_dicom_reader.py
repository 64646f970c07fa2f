"""DicomSliceReader: values, axis convention, compression and error messages on synthetic slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, LoadImaged
from scripts.dicom_reader import DicomSliceReader
from scripts.synthetic_dicom import write_mr_slice

UIDS = {"patient_id": "TEST-0001", "study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5"}


def _load(path):
    return LoadImage(reader=DicomSliceReader(), image_only=True)(path)


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.array([[0, 100], [200, 1000]], dtype=np.uint16)
    m1 = _load(write_mr_slice(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", **UIDS))
    m2 = _load(write_mr_slice(tmp_path / "m2.dcm", pixels, **UIDS))
    np.testing.assert_allclose(np.asarray(m2), pixels.T.astype(np.float32))
    # bright means high signal: inversion within the same value range
    np.testing.assert_allclose(np.asarray(m1), (1000 - pixels).T.astype(np.float32))


def test_signed_rescale_slope_intercept(tmp_path):
    pixels = np.array([[-300, -1, 0], [1, 250, 32000]], dtype=np.int16)
    img = _load(write_mr_slice(tmp_path / "s.dcm", pixels, rescale_slope=0.5, rescale_intercept=-10.0, **UIDS))
    assert img.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(img), (pixels.astype(np.float64) * 0.5 - 10.0).T)


def test_non_square_axis_convention(tmp_path):
    rows, cols = 20, 32
    pixels = np.zeros((rows, cols), dtype=np.uint16)
    pixels[3, 7] = 999  # row 3, column 7
    img = _load(write_mr_slice(tmp_path / "n.dcm", pixels, **UIDS))
    # MONAI convention (as PydicomReader/ITKReader): array is (x=columns, y=rows)
    assert tuple(img.shape) == (cols, rows)
    assert tuple(int(v) for v in img.meta["spatial_shape"]) == (cols, rows)
    assert float(img[7, 3]) == 999.0
    assert np.isnan(img.meta["original_channel_dim"])


def test_affine_matches_monai_pydicom_reader(tmp_path):
    from monai.data import PydicomReader

    pixels = np.arange(12 * 8, dtype=np.uint16).reshape(12, 8)
    path = write_mr_slice(tmp_path / "a.dcm", pixels, pixel_spacing=(0.5, 0.8), position=(10, -20, 30), **UIDS)
    ours = _load(path)
    theirs = LoadImage(reader=PydicomReader(), image_only=True)(path)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_allclose(ours.affine[:3, :2], theirs.affine[:3, :2])
    np.testing.assert_allclose(ours.affine[:3, 3], theirs.affine[:3, 3])


def test_rle_equals_uncompressed(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2000, size=(17, 23)).astype(np.uint16)
    raw = _load(write_mr_slice(tmp_path / "raw.dcm", pixels, **UIDS))
    rle = _load(write_mr_slice(tmp_path / "rle.dcm", pixels, compress_rle=True, **UIDS))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(rle))


def test_no_identifying_tags_in_meta(tmp_path):
    pixels = np.ones((4, 4), dtype=np.uint16)
    path = write_mr_slice(tmp_path / "p.dcm", pixels, patient_name="Secret^Name", patient_birth_date="19211231", **UIDS)
    data = LoadImaged(keys="image", reader=DicomSliceReader(), image_only=True)({"image": str(path)})
    meta = data["image"].meta
    assert meta["filename_or_obj"] == str(path)
    text = repr(dict(meta))
    assert "Secret" not in text and "19211231" not in text and "TEST-0001" not in text


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_broken_file_error_names_file(tmp_path, kind):
    good = write_mr_slice(tmp_path / "good.dcm", np.ones((64, 64), dtype=np.uint16) * 7, **UIDS)
    bad = tmp_path / f"{kind}.dcm"
    content = good.read_bytes()
    bad.write_bytes(content[: len(content) - 500] if kind == "truncated" else b"not a dicom file at all" * 10)
    with pytest.raises((RuntimeError, ValueError), match=kind):
        _load(bad)
    reader = DicomSliceReader()
    with pytest.raises((RuntimeError, ValueError), match=str(bad.name)):
        reader.get_data(reader.read(bad))


def test_verify_suffix(tmp_path):
    reader = DicomSliceReader()
    assert reader.verify_suffix("a/1-01.dcm")
    assert not reader.verify_suffix("a/image.nii.gz")
    noext = write_mr_slice(tmp_path / "IM0001", np.ones((4, 4), dtype=np.uint16), **UIDS)
    assert reader.verify_suffix(noext)
