"""The synthetic demo tree: layout, DICOM headers, CSV notations, determinism, grade signal, caching."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scripts.demo_data import MARKER_NAME, default_cache_dir, ensure_demo_dataset, generate_demo_dataset
from scripts.synthetic_dicom import AXIAL, SAGITTAL

SMALL = {"n_patients_per_grade": 2, "slices_per_series": 3, "image_size": (64, 64)}
N_SERIES = 6  # localizer, AX T1, SAG T1, AX T2, AX FLAIR, SAG T2


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL)


def _series_dirs(dicom_dir: str, pattern: str = "*") -> list[Path]:
    return sorted(Path(dicom_dir).glob(f"*/*/{pattern}"))


def test_tree_layout(small_demo):
    dicom_dir = Path(small_demo["dicom_dir"])
    patients = sorted(p.name for p in dicom_dir.iterdir())
    assert patients == [f"DEMO-{i:04d}" for i in range(1, 8)]  # 6 graded + 1 ungraded
    studies = list(dicom_dir.glob("*/*"))
    assert len(studies) == 7
    assert all(len(s.name.split("-")) >= 4 and "MRI BRAIN" in s.name for s in studies)
    assert len(_series_dirs(small_demo["dicom_dir"])) == 7 * N_SERIES
    sag_t1 = _series_dirs(small_demo["dicom_dir"], "*SAG T1*")
    assert len(sag_t1) == 7
    assert all(s.name.startswith("3.000000-SAG T1-") for s in sag_t1)
    assert all(len(list(s.glob("*.dcm"))) == 3 for s in sag_t1)
    n_files = len(list(dicom_dir.rglob("*.dcm")))
    assert n_files == 7 * (3 + 3 + 3 + 3 + 3 + 2)


def test_valid_mr_dicom_and_sagittal_t1_headers(small_demo):
    for path in Path(small_demo["dicom_dir"]).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MR"
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (64, 64)
        assert len(ds.SeriesInstanceUID) <= 64 and len(ds.FrameOfReferenceUID) <= 64
    for series in _series_dirs(small_demo["dicom_dir"], "*SAG T1*"):
        for path in series.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            assert ds.SeriesDescription == "SAG T1"
            assert [float(v) for v in ds.ImageOrientationPatient] == list(SAGITTAL)
            assert float(ds.RepetitionTime) == pytest.approx(500.0)
            assert float(ds.EchoTime) == pytest.approx(15.0)
            assert "LOCALIZER" not in ds.ImageType
            assert 0 < ds.pixel_array.max() <= 2100


def test_distractor_series_headers(small_demo):
    flair = pydicom.dcmread(next(_series_dirs(small_demo["dicom_dir"], "*AX FLAIR*")[0].glob("*.dcm")))
    assert float(flair.InversionTime) == pytest.approx(2500.0) and float(flair.RepetitionTime) == 9000.0
    assert [float(v) for v in flair.ImageOrientationPatient] == list(AXIAL)
    t2 = pydicom.dcmread(next(_series_dirs(small_demo["dicom_dir"], "*AX T2*")[0].glob("*.dcm")))
    assert (float(t2.RepetitionTime), float(t2.EchoTime)) == (4000.0, 100.0)
    loc_files = sorted(_series_dirs(small_demo["dicom_dir"], "*3-PLANE LOC*")[0].glob("*.dcm"))
    locs = [pydicom.dcmread(p) for p in loc_files]
    assert all("LOCALIZER" in ds.ImageType for ds in locs)
    assert len({tuple(ds.ImageOrientationPatient) for ds in locs}) == 3


def test_grades_csv_mixed_notations(small_demo):
    with open(small_demo["grades_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"Sample", "Grade"}
    grades = {r["Sample"]: r["Grade"] for r in rows}
    assert len(grades) == 8
    assert {"II", "III", "IV", "2", "3", "GBM"} <= set(grades.values())
    assert grades["DEMO-0007"] == "NA"  # images, no grade
    assert not (Path(small_demo["dicom_dir"]) / "DEMO-0008").exists()  # grade, no images


def test_deterministic(tmp_path, small_demo):
    again = generate_demo_dataset(tmp_path / "again", **SMALL)
    a = sorted(Path(small_demo["dicom_dir"]).rglob("*.dcm"))
    b = sorted(Path(again["dicom_dir"]).rglob("*.dcm"))
    assert [p.relative_to(small_demo["dicom_dir"]) for p in a] == [p.relative_to(again["dicom_dir"]) for p in b]
    for pa, pb in zip(a, b, strict=True):
        da, db = pydicom.dcmread(pa), pydicom.dcmread(pb)
        np.testing.assert_array_equal(da.pixel_array, db.pixel_array)
        assert da.SOPInstanceUID == db.SOPInstanceUID
    other = generate_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    first_other = sorted(Path(other["dicom_dir"]).rglob("*.dcm"))[0]
    assert not np.array_equal(pydicom.dcmread(a[0]).pixel_array, pydicom.dcmread(first_other).pixel_array)


def _inside_scalp(a: np.ndarray) -> np.ndarray:
    """Pixels between the first and last bright scalp pixel of their row (the head interior)."""
    inside = np.zeros(a.shape, dtype=bool)
    for r, row in enumerate(a):
        cols = np.flatnonzero(row > 1000)
        if len(cols) >= 2:
            inside[r, cols[0] + 2 : cols[-1] - 1] = True
    return inside


def test_grades_look_different(tmp_path):
    """Central SAG T1 slice features separate the grades over several patients (no masks needed).

    IV has a bright enhancing rim (T1 values above the scalp's), II a mildly hypointense homogeneous
    lesion (mid-dark pixels), III a larger heterogeneous lesion with very dark parts inside the head.
    (Checked on seeds 1-3; a small CNN reaches ~85 % patient-split slice accuracy within 8 CPU epochs.)
    """
    demo = generate_demo_dataset(tmp_path, n_patients_per_grade=4, slices_per_series=3, image_size=(64, 64), seed=1)
    features: dict[str, list[tuple[int, int, int]]] = {"II": [], "III": [], "IV": []}
    for i in range(12):
        series = next(Path(demo["dicom_dir"]).glob(f"DEMO-{i + 1:04d}/*/*SAG T1*"))
        a = pydicom.dcmread(sorted(series.glob("*.dcm"))[1]).pixel_array.astype(float)
        bright = int((a > 1460).sum())
        mid_dark = int(((a > 300) & (a < 560)).sum())
        very_dark = int(((a < 330) & _inside_scalp(a)).sum())
        features[("II", "III", "IV")[i % 3]].append((bright, mid_dark, very_dark))
    mean = {g: np.mean(v, axis=0) for g, v in features.items()}
    assert mean["IV"][0] > 50 and mean["II"][0] < 5 and mean["III"][0] < 5
    assert mean["II"][1] > 3 * mean["IV"][1]  # mildly hypointense lesion; IV has no mid-dark area
    assert mean["III"][2] > 2 * mean["II"][2]  # larger lesion with very dark parts


def test_default_size_is_fast(tmp_path):
    start = time.perf_counter()
    demo = generate_demo_dataset(tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"default demo took {elapsed:.1f} s"
    assert len(list(Path(demo["dicom_dir"]).iterdir())) == 37
    sag = next(Path(demo["dicom_dir"]).glob("DEMO-0001/*/*SAG T1*"))
    assert len(list(sag.glob("*.dcm"))) == 12
    assert pydicom.dcmread(next(sag.glob("*.dcm"))).pixel_array.shape == (160, 160)


def test_ensure_demo_dataset_caches_and_warns(tmp_path, caplog):
    cache = tmp_path / "cache" / "demo"
    with caplog.at_level(logging.WARNING, logger="scripts.demo_data"):
        first = ensure_demo_dataset(cache, **SMALL)
    assert "SYNTHETIC" in caplog.text
    assert (cache / MARKER_NAME).exists()
    assert not [p for p in cache.parent.iterdir() if p.name != "demo"]  # temp dirs cleaned up
    csv_mtime = Path(first["grades_csv"]).stat().st_mtime_ns
    a_file = next(Path(first["dicom_dir"]).rglob("*.dcm"))
    file_mtime = a_file.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.demo_data"):
        second = ensure_demo_dataset(cache, **SMALL)
    assert second == first
    assert "SYNTHETIC" in caplog.text
    assert Path(second["grades_csv"]).stat().st_mtime_ns == csv_mtime
    assert a_file.stat().st_mtime_ns == file_mtime


def test_ensure_demo_dataset_replaces_half_tree(tmp_path):
    cache = tmp_path / "demo"
    (cache / "dicom" / "DEMO-0001").mkdir(parents=True)  # left over by an interrupted older layout
    paths = ensure_demo_dataset(cache, **SMALL)
    assert (cache / MARKER_NAME).exists()
    assert len(list(Path(paths["dicom_dir"]).iterdir())) == 7


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SDL_GLIOMA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv("SDL_GLIOMA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sdl_glioma" / "demo"


def test_demo_slices_run_through_preprocessing(small_demo):
    from scripts.transforms import preprocessing_transforms

    path = next(Path(small_demo["dicom_dir"]).glob("DEMO-0003/*/*SAG T1*/*.dcm"))
    image = preprocessing_transforms(image_size=32)({"image": str(path)})["image"]
    assert tuple(image.shape) == (3, 32, 32) and 0.0 <= float(image.min()) < float(image.max()) <= 1.0
