"""The synthetic demo: real template anatomy, gliomas by kind, the known ceiling, masks, determinism, caching."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from scripts import demo_anatomy, demo_lesions
from scripts.demo_data import (
    INFO_NAME,
    MARKER_NAME,
    DemoPatient,
    _write_patient,
    ceiling_accuracy,
    default_cache_dir,
    demo_cohort,
    ensure_demo_dataset,
    generate_demo_dataset,
    render_series,
)
from scripts.synthetic_dicom import AXIAL, SAGITTAL

SMALL = {"n_patients_per_grade": 2, "slices_per_series": 3, "image_size": (64, 64)}
N_SERIES = 6  # localizer, AX T1, SAG T1, AX T2, AX FLAIR, SAG T2


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL)


@pytest.fixture(scope="module")
def default_patient(tmp_path_factory):
    """One patient at the default series size (20 slices of 256 x 256), a grade IV lesion."""
    root = tmp_path_factory.mktemp("default")
    info = _write_patient(
        root, DemoPatient(2, "DEMO-0003", "IV", "IV"), slices_per_series=20, image_size=(256, 256), seed=0
    )
    return root, info


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
    assert len(list(dicom_dir.rglob("*.dcm"))) == 7 * (3 + 3 + 3 + 3 + 3 + 2)
    masks = list(Path(small_demo["info"]).parent.glob("masks/DEMO-*/*.png"))
    assert len(masks) == 7 * 3  # one per SAG T1 slice


def test_valid_mr_dicom_and_sagittal_t1_headers(small_demo):
    for path in Path(small_demo["dicom_dir"]).rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MR"
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (64, 64)
        assert len(ds.SeriesInstanceUID) <= 64 and len(ds.FrameOfReferenceUID) <= 64
        assert 0 < ds.pixel_array.max() <= 4095
    for series in _series_dirs(small_demo["dicom_dir"], "*SAG T1*"):
        for path in series.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            assert ds.SeriesDescription == "SAG T1"
            assert [float(v) for v in ds.ImageOrientationPatient] == list(SAGITTAL)
            assert (float(ds.RepetitionTime), float(ds.EchoTime)) == (500.0, 15.0)
            assert float(ds.SliceThickness) == 5.0
            assert "LOCALIZER" not in ds.ImageType


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
    assert Path(small_demo["info"]).read_text() == Path(again["info"]).read_text()
    masks_a = sorted(Path(small_demo["info"]).parent.glob("masks/*/*.png"))
    masks_b = sorted(Path(again["info"]).parent.glob("masks/*/*.png"))
    for ma, mb in zip(masks_a, masks_b, strict=True):
        assert ma.read_bytes() == mb.read_bytes()
    other = generate_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    first_other = sorted(Path(other["dicom_dir"]).rglob("*.dcm"))[0]
    assert not np.array_equal(pydicom.dcmread(a[0]).pixel_array, pydicom.dcmread(first_other).pixel_array)


def test_default_series_shape_like_rembrandt(default_patient):
    root, info = default_patient
    series = next(root.glob("dicom/DEMO-0003/*/*SAG T1*"))
    files = sorted(series.glob("*.dcm"))
    assert len(files) == 20 and info["slices"] == 20
    slices = [pydicom.dcmread(f) for f in files]
    assert slices[0].pixel_array.shape == (256, 256)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    np.testing.assert_allclose(np.abs(np.diff(positions[:, 0])), 6.0, atol=1e-6)  # 5 mm slices, 6 mm apart
    assert 0 < info["slices_with_lesion"] < 20  # slices beside the tumour show none of it


def _middle_sag_t1(dicom_dir: Path, patient: str) -> np.ndarray:
    files = sorted(next(dicom_dir.glob(f"{patient}/*/*SAG T1*")).glob("*.dcm"))
    return pydicom.dcmread(files[len(files) // 2]).pixel_array.astype(np.float64)


def test_looks_like_a_t1_head(default_patient):
    """Dark air around a head; a bright scalp; inside, the template's white matter brighter than its grey matter."""
    root, _ = default_patient
    image = _middle_sag_t1(root / "dicom", "DEMO-0003")
    assert np.median(image[:8, :8]) < 0.1 * np.percentile(image, 95)  # air in the corner
    template = demo_anatomy.load_template()
    gm, wm = template.maps
    t1 = template.t1[0]
    assert float(t1[wm > 0.9].median()) == pytest.approx(1.0)
    assert float(t1[gm > 0.9].median()) < 0.85


def test_patients_differ_in_anatomy(small_demo):
    """Head size, tilt, warp and scanner differ per patient, so a slice-level split can recognise a patient."""
    dicom_dir = Path(small_demo["dicom_dir"])
    a, b = _middle_sag_t1(dicom_dir, "DEMO-0001"), _middle_sag_t1(dicom_dir, "DEMO-0004")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.98
    geometries = [demo_anatomy.random_geometry(np.random.default_rng([0, i])) for i in range(2)]
    assert not np.allclose(geometries[0].template_from_patient, geometries[1].template_from_patient)


def test_images_depend_on_the_grade_only_through_the_lesion_kind(tmp_path):
    """What makes the ceiling a ceiling: a grade III patient whose lesion looks like grade II gets exactly the
    pixels a grade II patient with that lesion gets, so no rule that reads the images can tell them apart."""
    size = {"slices_per_series": 3, "image_size": (48, 48), "seed": 0}
    mimic = _write_patient(tmp_path / "mimic", DemoPatient(4, "DEMO-0005", "III", "II"), **size)
    plain = _write_patient(tmp_path / "plain", DemoPatient(4, "DEMO-0005", "II", "II"), **size)
    assert mimic["mimic"] and not plain["mimic"]
    files = sorted((tmp_path / "mimic").rglob("*.dcm"))
    assert files
    for path in files:
        twin = tmp_path / "plain" / path.relative_to(tmp_path / "mimic")
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pydicom.dcmread(twin).pixel_array)
    other = _write_patient(tmp_path / "other", DemoPatient(4, "DEMO-0005", "III", "III"), **size)
    assert other["lesion_radius_mm"] != plain["lesion_radius_mm"] or other["lesion_kind"] != plain["lesion_kind"]


def test_cohort_mimics_neighbouring_grades():
    cohort = demo_cohort(12, 0.1, seed=0)
    graded = [p for p in cohort if p.grade is not None]
    assert len(graded) == 36 and cohort[-1].grade is None
    mimics = [p for p in graded if p.mimic]
    assert len(mimics) == 3  # round(0.1 * 12) = 1 per grade
    neighbours = {"II": {"III"}, "III": {"II", "IV"}, "IV": {"III"}}
    assert all(p.lesion_kind in neighbours[p.grade] for p in mimics)
    assert sorted(p.grade for p in mimics) == ["II", "III", "IV"]
    assert demo_cohort(12, 0.1, seed=0) == cohort and demo_cohort(12, 0.1, seed=1) != cohort
    assert not any(p.mimic for p in demo_cohort(12, 0.0, seed=0))
    with pytest.raises(ValueError, match="mimic_fraction"):
        demo_cohort(12, 1.5, seed=0)


def test_ceiling_is_what_the_oracle_rule_reaches():
    """The rule that knows each patient's lesion kind and answers the grade most patients of that kind have
    reaches the written ceiling; any rule answering a single grade per kind does no better."""
    cohort = [p for p in demo_cohort(12, 0.1, seed=0) if p.grade is not None]
    grades, kinds = [p.grade for p in cohort], [p.lesion_kind for p in cohort]
    assert ceiling_accuracy(grades, kinds) == pytest.approx(33 / 36)
    oracle = {"II": "II", "III": "III", "IV": "IV"}  # majority grade of each kind here
    assert np.mean([oracle[k] == g for g, k in zip(grades, kinds, strict=True)]) == pytest.approx(33 / 36)
    import itertools

    for answer in itertools.product(("II", "III", "IV"), repeat=3):  # every kind -> grade rule
        rule = dict(zip(("II", "III", "IV"), answer, strict=True))
        assert np.mean([rule[k] == g for g, k in zip(grades, kinds, strict=True)]) <= 33 / 36 + 1e-12
    weights = [2 if g == "II" else 1 for g in grades]
    assert ceiling_accuracy(grades, kinds, weights) == pytest.approx((2 * 11 + 11 + 11) / (2 * 12 + 12 + 12))


def test_demo_info_holds_the_ceilings(small_demo):
    info = json.loads(Path(small_demo["info"]).read_text())
    assert info["synthetic"] is True
    graded = [p for p in info["patients"] if p["grade"] is not None]
    assert len(graded) == 6 and len(info["patients"]) == 7
    expected = ceiling_accuracy([p["grade"] for p in graded], [p["lesion_kind"] for p in graded])
    assert info["ceiling_accuracy_patient"] == pytest.approx(expected, abs=1e-4)
    assert info["ceiling_accuracy_slice"] == pytest.approx(expected, abs=1e-4)  # equal slice counts
    assert "ICBM 2009a" in info["template"]


def test_default_ceiling_is_about_0_9():
    cohort = [p for p in demo_cohort(12, 0.1, seed=0) if p.grade is not None]
    ceiling = ceiling_accuracy([p.grade for p in cohort], [p.lesion_kind for p in cohort])
    assert 0.85 <= ceiling < 1.0


def test_masks_cover_the_lesion(default_patient):
    """Each SAG T1 slice's mask is written and listed; masks are non-empty only where the lesion is."""
    root, info = default_patient
    assert len(info["masks"]) == 20
    for row in info["masks"]:
        mask = np.asarray(Image.open(root / row["mask"]))
        image = pydicom.dcmread(root / row["image"])
        assert mask.shape == image.pixel_array.shape
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert row["sop_instance_uid"] == image.SOPInstanceUID
        assert int((mask == 1).sum()) == row["tumour_pixels"] and int((mask == 2).sum()) == row["oedema_pixels"]
    assert sum(r["tumour_pixels"] > 0 for r in info["masks"]) >= 3


def test_mask_covers_every_pixel_the_lesion_changes(monkeypatch):
    """Render the same slices with and without the lesion (no mass effect, no noise): every pixel whose signal
    the lesion changes lies in the mask (grown by two pixels, 4 mm, for the ill-defined border of grade II),
    and the tumour mask marks changed pixels."""
    template = demo_anatomy.load_template()
    rng = np.random.default_rng(3)
    geometry = demo_anatomy.PatientGeometry(np.eye(4), torch.zeros(3, 12, 12, 14), 1.0)  # the template itself
    for kind in demo_lesions.LESION_KINDS:
        lesion = demo_lesions.draw_lesion(kind, rng, template.lesion_sites[np.abs(template.lesion_sites[:, 0]) < 20])
        monkeypatch.setitem(
            demo_lesions.KIND_MODELS, kind, dataclasses.replace(demo_lesions.KIND_MODELS[kind], mass_effect=0.0)
        )
        x = -float(lesion.centre[0])  # LPS x of the plane through the lesion's centre
        positions = [(x, -120.0, 130.0), (x + 6.0, -120.0, 130.0)]
        kwargs = {"thickness": 5.0, "contrast": "t1", "geometry": geometry, "template": template}
        with_lesion, mask = render_series(positions, SAGITTAL, (128, 128), 2.0, lesion=lesion, **kwargs)
        without, empty = render_series(positions, SAGITTAL, (128, 128), 2.0, lesion=None, **kwargs)
        assert not empty.any()
        changed = (with_lesion - without).abs() > 0.1
        grown = torch.nn.functional.max_pool2d(mask[:, None].float(), 5, 1, 2)[:, 0] > 0
        assert changed.any(), kind
        assert bool((changed & ~grown).sum() <= 0.01 * changed.sum()), kind
        tumour = mask == 1
        assert tumour.sum() > 50, kind
        # most tumour pixels differ from the tissue they replace (grade III's patchy enhancement can match it)
        assert float(changed[tumour].float().mean()) > 0.8, kind


def test_lesion_kinds_have_their_parts():
    template = demo_anatomy.load_template()
    rng = np.random.default_rng(0)
    for kind in demo_lesions.LESION_KINDS:
        lesion = demo_lesions.draw_lesion(kind, rng, template.lesion_sites)
        offsets = torch.linspace(-1.5, 1.5, 61)[:, None] * torch.tensor([[lesion.radius, 0.0, 0.0]])
        parts = lesion.components(torch.from_numpy(lesion.centre.astype(np.float32)) + offsets)
        assert float(parts["tumour"][30]) > 0.95  # the centre is tumour
        assert float(parts["tumour"][0]) < 0.05  # 1.5 radii out is not
        has_core = float(parts["core"].max()) > 0.5
        assert has_core == (kind == "IV")
        assert (float(parts["oedema"].max()) > 0.5) == (kind in ("III", "IV"))
        if kind == "II":
            assert float(parts["enhancing"].max()) == 0.0
    with pytest.raises(ValueError, match="unknown lesion kind"):
        demo_lesions.draw_lesion("V", rng, template.lesion_sites)


def test_mass_effect_pushes_tissue_away():
    template = demo_anatomy.load_template()
    lesion = demo_lesions.draw_lesion("IV", np.random.default_rng(0), template.lesion_sites)
    centre = torch.from_numpy(lesion.centre.astype(np.float32))
    radii = torch.linspace(0.05, 3.0, 60) * lesion.radius
    points = centre + radii[:, None] * torch.tensor([[0.0, 0.0, 1.0]])
    source = (lesion.displace(points) - centre).norm(dim=-1)
    assert bool((source <= radii + 1e-4).all())  # tissue came from nearer the centre
    assert bool((torch.diff(source) > 0).all())  # no folds
    far = radii > 2.7 * lesion.radius
    torch.testing.assert_close(source[far], radii[far])  # beyond the taper nothing moves


def test_plane_points_follow_dicom_geometry():
    position, spacing = (10.0, -100.0, 80.0), 2.0
    points = demo_anatomy.plane_points(position, SAGITTAL, (4, 5), spacing, offsets=(0.0, 1.5))
    assert points.shape == (2, 4, 5, 3)
    # LPS (10, -100, 80) is RAS (-10, 100, 80); a row runs along +y (posterior, -y RAS), a column along -z
    torch.testing.assert_close(points[0, 0, 0], torch.tensor([-10.0, 100.0, 80.0]))
    torch.testing.assert_close(points[0, 2, 3], torch.tensor([-10.0, 100.0 - 3 * spacing, 80.0 - 2 * spacing]))
    torch.testing.assert_close(points[1, 0, 0] - points[0, 0, 0], torch.tensor([1.5, 0.0, 0.0]))  # normal: -x LPS


def test_missing_nilearn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(demo_anatomy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install nilearn"):
        demo_anatomy.template_dir()


def test_ensure_demo_dataset_caches_and_warns(tmp_path, caplog):
    cache = tmp_path / "cache" / "demo"
    with caplog.at_level(logging.WARNING, logger="scripts.demo_data"):
        first = ensure_demo_dataset(cache, **SMALL)
    assert "SYNTHETIC" in caplog.text
    assert (cache / MARKER_NAME).exists() and (cache / INFO_NAME).exists()
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
    third = ensure_demo_dataset(cache, **SMALL, seed=0, mimic_fraction=0.1)  # the defaults, spelt out
    assert third == first and a_file.stat().st_mtime_ns == file_mtime


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


def test_demo_figure_outlines_each_grade(small_demo, tmp_path):
    """The README's picture: a 3 x 2 grid of real slices with red (tumour) outlines drawn on them."""
    from scripts.demo_figures import demo_slices_figure

    root = Path(small_demo["dicom_dir"]).parent
    out = demo_slices_figure(root, tmp_path / "figure.png")
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 80) & (picture[..., 2] < 80)
    assert picture.shape[0] > picture.shape[1]  # three rows of two
    assert red.sum() > 20
