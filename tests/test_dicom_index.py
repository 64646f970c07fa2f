"""DICOM indexer: selection rules, skip reasons, the grade join, report files and privacy."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)
from scripts import dicom_index
from scripts.dicom_headers import decoder_available
from scripts.dicom_index import (
    build_datalist,
    index_dicom_tree,
    inspect_file,
    write_datalist,
)
from scripts.synthetic_dicom import AXIAL, CORONAL, LOCALIZER_IMAGE_TYPE, write_mr_slice

FAKE_NAME = "Fakename^Secretperson"
FAKE_BIRTH = "19231231"
PIXELS = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
_counter = itertools.count(1)


def mr(path: Path, *, patient_id: str = "P1", series: int = 1, instance: int | None = None, **kwargs) -> Path:
    """Write one small MR slice with the synthetic fake name/birth date; defaults make a sagittal T1."""
    instance = next(_counter) if instance is None else instance
    kwargs.setdefault("patient_name", FAKE_NAME)
    kwargs.setdefault("patient_birth_date", FAKE_BIRTH)
    return write_mr_slice(
        path,
        PIXELS,
        patient_id=patient_id,
        study_uid=f"1.2.826.0.1.3680043.9.1.{sum(map(ord, patient_id))}",
        series_uid=f"1.2.826.0.1.3680043.9.1.{sum(map(ord, patient_id))}.{series}",
        series_number=series,
        instance_number=instance,
        **kwargs,
    )


def patch(path: Path, **attrs) -> Path:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def only(result, path: Path) -> dict:
    """The outcome (slice or skip) of one file of an index."""
    matches = [s for s in result.slices if s["image"] == str(path)] + [
        s for s in result.skipped if s["path"] == str(path)
    ]
    assert len(matches) == 1, matches
    return matches[0]


def outcome(path: Path, **kwargs) -> dict:
    return inspect_file(str(path), **kwargs)


# --- selection rules --------------------------------------------------------------------------------------------
def test_sagittal_t1_selected_with_record_fields(tmp_path):
    path = mr(tmp_path / "P1" / "st" / "se" / "1.dcm", instance=7)
    result = index_dicom_tree(tmp_path)
    assert result.files_scanned == 1 and result.n_selected == 1 and not result.skipped
    item = result.slices[0]
    assert item["image"] == str(path.resolve())
    assert item["patient_id"] == "P1" and item["instance_number"] == 7 and item["series_number"] == 1
    assert (item["rows"], item["columns"]) == (16, 16)
    assert item["series_description"] == "SAG T1"


@pytest.mark.parametrize(("orientation", "plane"), [(AXIAL, "axial"), (CORONAL, "coronal")])
def test_axial_and_coronal_are_skipped(tmp_path, orientation, plane):
    result = outcome(mr(tmp_path / "a.dcm", orientation=orientation, series_description="T1"))
    assert result["reason"] == "not_sagittal" and plane in result["detail"]


def test_oblique_sagittal_is_selected(tmp_path):
    angle = np.deg2rad(30)
    oblique = (np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, -1.0)  # 30 degrees off true sagittal
    assert outcome(mr(tmp_path / "a.dcm", orientation=oblique))["kind"] == "slice"
    too_far = (np.cos(angle), np.sin(angle), 0.0, 0.0, 0.0, -1.0)  # 60 degrees off: closer to coronal
    assert outcome(mr(tmp_path / "b.dcm", orientation=too_far))["reason"] == "not_sagittal"


def test_missing_orientation_falls_back_to_description(tmp_path):
    assert outcome(mr(tmp_path / "a.dcm", orientation=None, series_description="SAG T1"))["kind"] == "slice"
    assert outcome(mr(tmp_path / "b.dcm", orientation=None, series_description="Sagittal_T1"))["kind"] == "slice"
    skipped = outcome(mr(tmp_path / "c.dcm", orientation=None, series_description="AX T1"))
    assert skipped["reason"] == "not_sagittal" and "no usable ImageOrientationPatient" in skipped["detail"]


def test_orientation_wins_over_description(tmp_path):
    assert outcome(mr(tmp_path / "a.dcm", orientation=AXIAL, series_description="SAG T1"))["reason"] == "not_sagittal"


@pytest.mark.parametrize(
    ("tr", "te", "ti", "description", "expected"),
    [
        (500.0, 15.0, None, "SAG SE", "slice"),  # T1 by TR/TE, description silent
        (20.0, 5.0, None, "SAG 3D", "slice"),  # spoiled gradient echo T1
        (4000.0, 100.0, None, "SAG T1", "not_t1_t2"),  # timing wins over a wrong description
        (4000.0, 100.0, None, "SAG FSE", "not_t1_t2"),
        (9000.0, 120.0, 2500.0, "SAG", "not_t1_flair"),  # FLAIR by inversion time
        (500.0, 15.0, None, "SAG FLAIR", "not_t1_flair"),  # FLAIR by description
        (3000.0, 15.0, None, "SAG", "not_t1_pd"),  # long TR, short TE
        (1900.0, 3.0, 900.0, "SAG MPRAGE", "slice"),  # inversion-prepared T1
        (2300.0, 3.0, 1100.0, "SAG 3D", "slice"),
        (None, None, None, "SAG T1", "slice"),  # description fall-backs
        (None, None, None, "SAG_T1W_SE", "slice"),
        (None, None, None, "SAG MPRAGE", "slice"),
        (None, None, None, "SAG FSPGR", "slice"),
        (None, None, None, "SAG SPGR", "slice"),
        (None, None, None, "SAG T2", "not_t1_t2"),
        (None, None, None, "SAG T2 FLAIR", "not_t1_flair"),
        (None, None, None, "SAG PD", "not_t1_pd"),
        (None, None, None, "SAG", "not_t1_unknown"),
        (500.0, None, None, "SAG T1", "slice"),  # only TR present: description decides
    ],
)
def test_weighting_rules(tmp_path, tr, te, ti, description, expected):
    path = mr(tmp_path / "a.dcm", repetition_time=tr, echo_time=te, series_description=description)
    if ti is not None:
        patch(path, InversionTime=ti)
    result = outcome(path)
    assert (result["kind"] if expected == "slice" else result.get("reason")) == expected, result


def test_not_t1_detail_says_which(tmp_path):
    result = outcome(mr(tmp_path / "a.dcm", repetition_time=4000.0, echo_time=100.0))
    assert result["detail"].startswith("T2:") and "TE 100" in result["detail"]


@pytest.mark.parametrize(
    ("kwargs", "post"),
    [
        ({"contrast_agent": "MAGNEVIST"}, True),
        ({"series_description": "SAG T1 +C"}, True),
        ({"series_description": "SAG T1 POST GAD"}, True),
        ({"series_description": "SAG_T1_C+"}, True),
        ({"series_description": "SAG T1 PRE"}, False),
        ({"series_description": "SAG T1 W/O CONTRAST"}, False),
        ({}, False),
    ],
)
def test_post_contrast_in_by_default_out_with_switch(tmp_path, kwargs, post):
    path = mr(tmp_path / "a.dcm", **kwargs)
    assert outcome(path)["kind"] == "slice"
    excluded = outcome(path, include_post_contrast=False)
    if post:
        assert excluded["reason"] == "post_contrast_excluded"
    else:
        assert excluded["kind"] == "slice"


# --- skip reasons ----------------------------------------------------------------------------------------------
def _write_basic_text_sr(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientID = "P1"
    ds.PatientName = FAKE_NAME
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_encapsulated(path: Path, tsyntax: str, fragment: bytes) -> Path:
    path = mr(path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def test_non_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    (tmp_path / "README").write_text("no suffix, not DICOM\n" * 20)
    result = index_dicom_tree(tmp_path)
    assert result.skipped_by_reason == {"not_dicom": 3}
    assert all("not a DICOM file" in s["detail"] for s in result.skipped)


def test_hidden_files_and_directories_are_ignored(tmp_path):
    mr(tmp_path / ".hidden" / "x.dcm")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1\2")
    mr(tmp_path / "P1" / "ok.dcm")
    result = index_dicom_tree(tmp_path)
    assert result.files_scanned == 1 and result.n_selected == 1


def test_structured_report_is_non_image(tmp_path):
    result = outcome(_write_basic_text_sr(tmp_path / "sr.dcm"))
    assert result["reason"] == "non_image" and "Basic Text SR" in result["detail"]


def test_non_mr_modality(tmp_path):
    result = outcome(patch(mr(tmp_path / "a.dcm"), Modality="CT"))
    assert result["reason"] == "not_mr" and "CT" in result["detail"]


def test_localizer_by_image_type_and_by_description(tmp_path):
    by_type = outcome(mr(tmp_path / "a.dcm", image_type=LOCALIZER_IMAGE_TYPE, series_description="SAG"))
    assert by_type["reason"] == "localizer" and "ImageType" in by_type["detail"]
    for i, description in enumerate(["3-PLANE LOC", "3 Plane Loc", "SCOUT", "AAHead_Scout", "localizer T1"]):
        result = outcome(mr(tmp_path / f"d{i}.dcm", series_description=description))
        assert result["reason"] == "localizer", description


def test_duplicate_sop_instance_keeps_first_by_path(tmp_path):
    uid = generate_uid()
    first = mr(tmp_path / "P1" / "a" / "1.dcm", sop_instance_uid=uid)
    second = mr(tmp_path / "P1" / "b" / "1.dcm", sop_instance_uid=uid)
    result = index_dicom_tree(tmp_path)
    assert [s["image"] for s in result.slices] == [str(first)]
    skip = only(result, second)
    assert skip["reason"] == "duplicate_sop_instance" and str(first) in skip["detail"]


def test_truncated_file(tmp_path):
    path = mr(tmp_path / "a.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    result = outcome(path)
    assert result["reason"] == "pixel_data_truncated" and "462 bytes" in result["detail"]
    big = mr(tmp_path / "big.dcm")
    ds = pydicom.dcmread(big)
    ds.PixelData = np.zeros((64, 64), np.uint16).tobytes()  # above DEFER_SIZE: checked against the file size
    ds.Rows = ds.Columns = 64
    ds.save_as(big)
    big.write_bytes(big.read_bytes()[:-50])
    result = outcome(big)
    assert result["reason"] == "pixel_data_truncated" and "ends 50 bytes before" in result["detail"]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:600])  # cut inside the header, before PixelData
    assert outcome(cut)["reason"] == "pixel_data_truncated"


def test_pixel_data_shorter_than_header_says(tmp_path):
    path = mr(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)
    result = outcome(path)
    assert result["reason"] == "pixel_data_truncated" and "header implies 512" in result["detail"]


def test_compressed_without_decoder_is_undecodable(tmp_path):
    if decoder_available(JPEGLSLossless):
        pytest.skip("a JPEG-LS decoder is installed here")
    path = _write_encapsulated(tmp_path / "a.dcm", JPEGLSLossless, b"\xff\xd8\xff\xf7" + b"\0" * 60)
    result = outcome(path)
    assert result["reason"] == "pixel_data_undecodable" and "no pixel data decoder" in result["detail"]


def test_garbage_jpeg2000_is_undecodable(tmp_path):
    path = _write_encapsulated(tmp_path / "a.dcm", JPEG2000Lossless, os.urandom(64))
    result = outcome(path)
    assert result["reason"] == "pixel_data_undecodable"
    if decoder_available(JPEG2000Lossless):
        assert "not a valid" in result["detail"]


def test_rle_file_is_selected(tmp_path):
    assert outcome(mr(tmp_path / "a.dcm", compress_rle=True))["kind"] == "slice"


def test_unreadable_files_never_stop_the_index(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(0).bytes(2000))
    broken = tmp_path / "broken.dcm"
    broken.symlink_to(tmp_path / "does-not-exist.dcm")
    good = mr(tmp_path / "good.dcm")
    result = index_dicom_tree(tmp_path)
    assert [s["image"] for s in result.slices] == [str(good)]
    assert only(result, garbage)["reason"] == "unreadable"
    skip = only(result, broken)
    assert skip["reason"] == "unreadable" and "FileNotFoundError" in skip["detail"]


def test_suffixes_and_depth(tmp_path):
    paths = [
        mr(tmp_path / "P1" / "a.dcm"),
        mr(tmp_path / "P1" / "study" / "series" / "IM0001"),
        mr(tmp_path / "P1" / "s" / "t" / "u" / "v" / "w" / "1.DCM"),
        mr(tmp_path / "loose_file"),
    ]
    result = index_dicom_tree(tmp_path)
    assert sorted(s["image"] for s in result.slices) == sorted(str(p) for p in paths)


def test_empty_patient_id_falls_back_to_top_folder(tmp_path):
    mr(tmp_path / "HF1234" / "study" / "series" / "1.dcm", patient_id="")
    assert index_dicom_tree(tmp_path).slices[0]["patient_id"] == "HF1234"


def _mixed_tree(root: Path) -> None:
    for p in range(3):
        pid = f"P{p}"
        for i in range(1, 5):
            mr(root / pid / "st" / "sag" / f"{i}.dcm", patient_id=pid, series=1, instance=i)
            mr(root / pid / "st" / "ax" / f"{i}", patient_id=pid, series=2, instance=i, orientation=AXIAL)
        (root / pid / "notes.txt").write_text("x")


def test_pool_gives_the_same_result_as_in_process(tmp_path, monkeypatch):
    _mixed_tree(tmp_path)
    serial = index_dicom_tree(tmp_path, workers=1)
    monkeypatch.setattr(dicom_index, "MIN_FILES_FOR_POOL", 0)
    parallel = index_dicom_tree(tmp_path, workers=2)
    assert parallel.slices == serial.slices and parallel.skipped == serial.skipped
    assert serial.n_selected == 12 and serial.skipped_by_reason == {"not_dicom": 3, "not_sagittal": 12}


def test_slices_sorted_by_patient_series_instance(tmp_path):
    for pid in ["P2", "P1"]:
        for series in [2, 1]:
            for inst in [10, 2, 1]:
                mr(tmp_path / pid / f"s{series}" / f"z{inst}.dcm", patient_id=pid, series=series, instance=inst)
    keys = [(s["patient_id"], s["series_number"], s["instance_number"]) for s in index_dicom_tree(tmp_path).slices]
    assert keys == sorted(keys)


def test_index_dicom_tree_accepts_file_series_and_tree(tmp_path):
    series = tmp_path / "P1" / "st" / "se"
    files = [mr(series / f"{i}.dcm", instance=i) for i in range(1, 4)]
    mr(tmp_path / "P1" / "st" / "ax" / "1.dcm", orientation=AXIAL)
    assert index_dicom_tree(files[0]).n_selected == 1
    assert index_dicom_tree(series).n_selected == 3
    tree = index_dicom_tree(tmp_path)
    assert tree.n_selected == 3 and tree.skipped_by_reason == {"not_sagittal": 1}


def test_empty_selection_is_not_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    result = index_dicom_tree(tmp_path)
    assert result.slices == [] and result.n_skipped == 1


def test_missing_root_raises_with_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        index_dicom_tree(tmp_path / "no-such-dir")


TESTDATA = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_truncated.dcm",
    "MR2_J2KI.dcm",
    "MR2_J2KR.dcm",
    "MR2_UNCI.dcm",
    "MR2_UNCR.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "CT_small.dcm",
    "rtplan.dcm",
    "SC_rgb.dcm",
]


def test_pydicom_real_test_files(tmp_path):
    copied = {}
    for i, name in enumerate(TESTDATA):
        source = get_testdata_file(name)  # by exact name only: a pattern would try to download
        if source is None:
            continue
        target = tmp_path / f"PT{i % 3}" / name if i % 2 else tmp_path / f"PT{i % 3}" / "sub" / name[:-4]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied[name] = target
    assert len(copied) >= 5
    result = index_dicom_tree(tmp_path, workers=1)
    assert result.files_scanned == len(copied)
    for name, path in copied.items():
        item = only(result, path)
        assert "image" in item or (item["reason"] and item["detail"]), name
    expected = {
        "MR_small.dcm": "not_sagittal",
        "MR_truncated.dcm": "pixel_data_truncated",
        "CT_small.dcm": "not_mr",
        "rtplan.dcm": "non_image",
        "MR2_UNCR.dcm": "selected",  # oblique sagittal, TR 350 / TE 27
        "MR2_J2KR.dcm": "selected",
    }
    for name, reason in expected.items():
        if name in copied:
            item = only(result, copied[name])
            assert item.get("reason", "selected") == reason, (name, item)


# --- grade join, reports, privacy --------------------------------------------------------------------------------
def _dataset(root: Path) -> Path:
    """P1 grade II, P2 GBM, P3 no grade, P5 not in the CSV, P6 conflicting; P4 in the CSV without images."""
    for pid, n in [("P1", 3), ("P2", 2), ("P3", 1), ("P5", 1), ("P6", 1)]:
        for i in range(1, n + 1):
            mr(root / "dicom" / pid / "st" / "t1" / f"{i}.dcm", patient_id=pid, instance=n + 1 - i)
        mr(root / "dicom" / pid / "st" / "t2" / "1.dcm", patient_id=pid, series=2, repetition_time=4000, echo_time=90)
    (root / "dicom" / "P1" / "manifest.json").write_text("{}")
    csv_path = root / "grades.csv"
    csv_path.write_text("\ufeffSample,Grade\n p1 ,II\nP2,GBM\nP3,NA\nP4,III\nP6,II\nP6,IV\n", encoding="utf-8")
    return csv_path


def test_build_datalist_join_and_report(tmp_path):
    csv_path = _dataset(tmp_path)
    records, report = build_datalist(tmp_path / "dicom", csv_path, workers=1)
    assert [(r["patient_id"], r["grade"], r["label"], r["instance_number"]) for r in records] == [
        ("P1", "II", 0, 1),
        ("P1", "II", 0, 2),
        ("P1", "II", 0, 3),
        ("P2", "IV", 2, 1),
        ("P2", "IV", 2, 2),
    ]
    assert list(records[0]) == [
        "image", "label", "grade", "patient_id", "study_uid", "series_uid", "sop_instance_uid",
        "instance_number", "series_number", "series_description", "rows", "columns",
    ]  # fmt: skip
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in records)
    assert report["per_grade"] == {
        "II": {"label": 0, "patients": 1, "slices": 3},
        "IV": {"label": 2, "patients": 1, "slices": 2},
    }
    without_grade = {p["patient_id"]: p["reason"] for p in report["patients_without_grade"]}
    assert without_grade == {
        "P3": "missing grade",
        "P5": "not in the grades CSV",
        "P6": "conflicting grades II, IV",
    }
    assert [p["patient_id"] for p in report["patients_without_images"]] == ["P4"]
    assert report["skipped_by_reason"] == {"not_dicom": 1, "not_t1_t2": 5}
    assert report["slices_selected"] == 8 and report["slices_in_datalist"] == 5


def test_lgg_hgg_label_map(tmp_path):
    csv_path = _dataset(tmp_path)
    records, report = build_datalist(
        tmp_path / "dicom",
        csv_path,
        label_map={"LGG": 0, "HGG": 1},
        grade_aliases={"II": "LGG", "III": "HGG", "IV": "HGG"},
    )
    assert {(r["patient_id"], r["grade"], r["label"]) for r in records} == {("P1", "LGG", 0), ("P2", "HGG", 1)}
    assert "P6" in {p["patient_id"] for p in report["patients_without_grade"]}  # II vs IV still conflicts


def test_write_datalist_outputs_and_privacy(tmp_path, caplog):
    csv_path = _dataset(tmp_path)
    out = tmp_path / "out" / "datalist.json"
    with caplog.at_level(logging.DEBUG):
        records = write_datalist(tmp_path / "dicom", csv_path, out, label_map=None, grade_aliases=None)
    assert json.loads(out.read_text()) == records and len(records) == 5
    report = (tmp_path / "out" / "datalist_report.md").read_text()
    skipped_csv = tmp_path / "out" / "datalist_skipped.csv"
    rows = list(csv.DictReader(skipped_csv.open()))
    assert {r["reason"] for r in rows} == {"not_dicom", "not_t1_t2"} and len(rows) == 6
    for text in ["P3", "P4", "P5", "P6", "conflicting grades II, IV", "not_t1_t2", "manifest.json"]:
        assert text in report
    assert any("datalist" in r.getMessage() and "5 slices" in r.getMessage() for r in caplog.records)
    outputs = [out.read_text(), report, skipped_csv.read_text(), caplog.text]
    for text in outputs:
        for secret in [FAKE_NAME, "Fakename", "Secretperson", FAKE_BIRTH]:
            assert secret not in text


def test_write_datalist_with_dict_maps(tmp_path):
    csv_path = _dataset(tmp_path)
    records = write_datalist(
        tmp_path / "dicom",
        csv_path,
        tmp_path / "dl.json",
        label_map={"LGG": "0", "HGG": 1},
        grade_aliases={"II": "LGG", "III": "HGG", "IV": "HGG"},
    )
    assert {r["label"] for r in records} == {0, 1}


def test_write_datalist_raises_when_nothing_joins_but_writes_report(tmp_path):
    mr(tmp_path / "dicom" / "X1" / "1.dcm", patient_id="X1")
    csv_path = tmp_path / "grades.csv"
    csv_path.write_text("Sample,Grade\nP1,II\n")
    out = tmp_path / "dl.json"
    with pytest.raises(ValueError) as err:
        write_datalist(tmp_path / "dicom", csv_path, out)
    message = str(err.value)
    assert str(tmp_path / "dicom") in message and str(csv_path) in message and "dl_report.md" in message
    assert (tmp_path / "dl_report.md").is_file() and (tmp_path / "dl_skipped.csv").is_file()
    assert "X1" in (tmp_path / "dl_report.md").read_text()


def test_missing_csv_or_dataset_raise_with_path(tmp_path):
    mr(tmp_path / "dicom" / "P1" / "1.dcm")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        build_datalist(tmp_path / "dicom", tmp_path / "missing.csv")
    (tmp_path / "g.csv").write_text("Sample,Grade\nP1,II\n")
    with pytest.raises(FileNotFoundError, match="nodata"):
        build_datalist(tmp_path / "nodata", tmp_path / "g.csv")


def test_custom_columns_via_write_datalist(tmp_path):
    mr(tmp_path / "dicom" / "hf0001" / "1.dcm", patient_id="HF0001")
    csv_path = tmp_path / "clinical.csv"
    csv_path.write_text("PATIENT_ID,WHO_GRADE\nhf0001 ,WHO grade 3\n")
    records = write_datalist(
        tmp_path / "dicom", csv_path, tmp_path / "dl.json", patient_column="patient_id", grade_column="who_grade"
    )
    assert [(r["patient_id"], r["grade"], r["label"]) for r in records] == [("HF0001", "III", 1)]


def test_implicit_data_set_under_explicit_transfer_syntax_is_read(tmp_path):
    """Some exporters declare explicit VR but write implicit VR; the fast reader defers to pydicom then."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(mr(tmp_path / "src.dcm"))
    path = tmp_path / "mismatch.dcm"
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        fp = DicomFileLike(handle)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
        fp.is_implicit_VR = True
        write_dataset(fp, ds)
    result = outcome(path)
    assert result["kind"] == "slice" and result["rows"] == 16


def test_every_reason_code_is_explained():
    from scripts import skip_reasons

    names = [name for name in vars(skip_reasons) if name.startswith("REASON_") and name != "REASON_DESCRIPTIONS"]
    codes = {getattr(skip_reasons, name) for name in names}
    assert codes == set(skip_reasons.REASON_DESCRIPTIONS)


def test_dicomdir_and_multi_frame_files_get_their_own_reasons(tmp_path):
    good = mr(tmp_path / "series" / "1.dcm")
    enhanced = mr(tmp_path / "series" / "2.dcm", patient_id="P1")
    ds = pydicom.dcmread(enhanced)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(enhanced)
    shutil.copy(good, tmp_path / "DICOMDIR")  # the standard's name for a medium's index file
    result = index_dicom_tree(tmp_path)
    assert [s["image"] for s in result.slices] == [str(good)]
    assert only(result, enhanced)["reason"] == "multi_frame" and "3 frames" in only(result, enhanced)["detail"]
    assert only(result, tmp_path / "DICOMDIR")["reason"] == "dicomdir"


def test_symlinked_folders_are_followed_once_and_loops_reported(tmp_path):
    store = tmp_path / "store" / "P2"
    linked = mr(store / "1.dcm", patient_id="P2")
    tree = tmp_path / "tree"
    mr(tree / "P1" / "1.dcm", patient_id="P1")
    (tree / "P2").symlink_to(store, target_is_directory=True)  # a patient folder assembled from a link
    (tree / "P1" / "back").symlink_to(tree, target_is_directory=True)  # a loop
    result = index_dicom_tree(tree)
    assert sorted(s["patient_id"] for s in result.slices) == ["P1", "P2"]
    assert any(s["image"].endswith(os.path.join("P2", "1.dcm")) for s in result.slices), linked
    (loop,) = [s for s in result.skipped if s["reason"] == "link_loop"]
    assert loop["path"] == str(tree.resolve() / "P1" / "back")


def test_an_unlistable_folder_is_reported(tmp_path, monkeypatch):
    mr(tmp_path / "P1" / "1.dcm", patient_id="P1")
    mr(tmp_path / "P2" / "1.dcm", patient_id="P2")
    locked = str((tmp_path / "P2").resolve())
    scandir = os.scandir

    def refusing(path=None):  # as for a chmod 000 folder (root, who runs CI, may read any folder)
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    result = index_dicom_tree(tmp_path)
    assert [s["patient_id"] for s in result.slices] == ["P1"]
    (problem,) = [s for s in result.skipped if s["reason"] == "folder_unreadable"]
    assert problem["path"] == locked and "Permission denied" in problem["detail"]


def test_file_names_that_are_not_utf8_are_indexed_and_written(tmp_path):
    tree = tmp_path / "dicom"
    mr(tree / "P1" / "1.dcm", patient_id="P1")
    odd = os.fsdecode(os.fsencode(str(tree / "P1")) + b"/caf\xe9.dcm")  # Latin-1 bytes in a name: a surrogate in Python
    mr(Path(odd), patient_id="P1")
    Path(odd + "x").write_bytes(b"not a DICOM file")
    grades = tmp_path / "grades.csv"
    grades.write_text("Sample,Grade\nP1,II\n")
    records = write_datalist(tree, grades, tmp_path / "dl.json")
    assert odd in {r["image"] for r in records}  # JSON escapes the surrogate, so the path reads back exactly
    assert "caf\\udce9.dcmx" in (tmp_path / "dl_skipped.csv").read_text(encoding="utf-8")
    assert "caf\\udce9.dcmx" in (tmp_path / "dl_report.md").read_text(encoding="utf-8")


def test_indexing_logs_a_summary_line(tmp_path, caplog):
    mr(tmp_path / "P1" / "1.dcm")
    (tmp_path / "P1" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="scripts.dicom_index"):
        index_dicom_tree(tmp_path, workers=1)
    assert re.search(r"inspected 2 files in [\d.]+ s \(\d+ files/s\), 1 skipped", caplog.text), caplog.text
