"""The embedded demo dataset: a small SYNTHETIC, REMBRANDT-shaped DICOM tree with a grade CSV.

It lets the whole bundle (indexing, training, evaluation, reporting) run end to end without downloading
patient data, and it exercises what the real collection throws at the pipeline: several series per study
of which only the sagittal T1 is used, a 3-plane localizer, TCIA folder names, mixed grade notations
("II", "3", "GBM"), a patient without a grade and a CSV row without images.

Images are head-like ellipses with tissue texture (blobs from MONAI's ``create_test_image_2d``) and a lesion
whose appearance depends on the grade, strongly enough for a small CNN to learn in a few CPU epochs:

* grade II: small, homogeneous, mildly hypointense, smooth border;
* grade III: larger, heterogeneous (cyst-like blobs), irregular border;
* grade IV: ring-enhancing rim around a dark necrotic core, surrounded by hypointense oedema.

The lesion is largest in the central slices and shrinks towards the edges of the series; every slice
still carries the patient's grade, as REMBRANDT slices do. Everything is deterministic in ``seed``
(pixels and UIDs); nothing here is patient data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.synthetic import create_test_image_2d

from scripts.synthetic_dicom import AXIAL, CORONAL, LOCALIZER_IMAGE_TYPE, SAGITTAL, write_mr_slice

__all__ = [
    "DEMO_GRADES",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "default_cache_dir",
    "ensure_demo_dataset",
    "generate_demo_dataset",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
MARKER_NAME = ".sdl_demo_complete.json"
DEMO_GRADES = ("II", "III", "IV")
# Notations cycled per patient, as REMBRANDT's clinical tables mix them.
_NOTATIONS = {"II": ("II", "2"), "III": ("III", "3"), "IV": ("IV", "GBM")}
_SYNTHETIC_WARNING = "Using SYNTHETIC demo data (generated images, NOT patient data) at %s"


@dataclass(frozen=True)
class _Series:
    """One series of a demo study: what the indexer must keep (SAG T1) or reject (everything else)."""

    number: int
    description: str
    orientation: tuple[float, ...]
    tr: float
    te: float
    contrast: str  # "t1" | "t2" | "flair"
    n_slices: int | None = None  # None -> slices_per_series
    inversion_time: float | None = None
    localizer: bool = False


_SERIES = (
    _Series(1, "3-PLANE LOC", SAGITTAL, 8.6, 1.6, "t1", n_slices=3, localizer=True),
    _Series(2, "AX T1", AXIAL, 550.0, 12.0, "t1", n_slices=3),
    _Series(3, "SAG T1", SAGITTAL, 500.0, 15.0, "t1"),
    _Series(4, "AX T2", AXIAL, 4000.0, 100.0, "t2", n_slices=3),
    _Series(5, "AX FLAIR", AXIAL, 9000.0, 140.0, "flair", n_slices=3, inversion_time=2500.0),
    _Series(6, "SAG T2", SAGITTAL, 4200.0, 102.0, "t2", n_slices=2),
)

# Tissue intensities per contrast: background, scalp/fat, brain, csf.
_TISSUE = {
    "t1": {"scalp": 1400.0, "brain": 760.0, "csf": 220.0},
    "t2": {"scalp": 700.0, "brain": 600.0, "csf": 1700.0},
    "flair": {"scalp": 800.0, "brain": 650.0, "csf": 150.0},
}


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    """Separable box blur (edge-padded) used to soften texture; scipy is not a dependency."""
    if k <= 1:
        return img
    pad = k // 2
    out = np.pad(img, pad, mode="edge")
    for axis in (0, 1):
        c = np.cumsum(out, axis=axis)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        n = out.shape[axis]
        out = (c.take(range(k, n + 1), axis=axis) - c.take(range(0, n + 1 - k), axis=axis)) / k
    return out[: img.shape[0], : img.shape[1]]


def _texture(shape: tuple[int, int], rs: np.random.RandomState) -> np.ndarray:
    """Soft blob texture in [0, 1] from MONAI's synthetic image generator."""
    h, w = shape
    rad_max = max(3, min(h, w) // 10)
    img, _ = create_test_image_2d(h, w, num_objs=25, rad_max=rad_max, rad_min=2, noise_max=0.0, random_state=rs)
    return _box_blur(img, 3)


def _lesion(
    grade: str,
    rr: np.ndarray,
    theta: np.ndarray,
    radius: float,
    brain: float,
    tex: np.ndarray,
    contrast: str,
    shape_phase: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (mask weight 0..1 of the affected area, intensity there) for one lesion.

    ``rr`` is the distance from the lesion centre in pixels, ``theta`` the angle around it.
    """
    bright = contrast != "t1"  # on T2/FLAIR lesions and oedema are hyperintense
    if grade == "II":
        edge = radius
        w = np.clip((edge - rr) / 1.5 + 0.5, 0, 1)
        value = brain * (1.45 if bright else 0.6)
        return w, np.full_like(rr, value)
    if grade == "III":
        edge = radius * (1 + 0.18 * np.sin(3 * theta + shape_phase[0]) + 0.1 * np.sin(5 * theta + shape_phase[1]))
        w = np.clip((edge - rr) / 1.5 + 0.5, 0, 1)
        value = brain * (1.5 if bright else 0.55) + (tex - 0.5) * brain * 1.5
        return w, value
    # grade IV: oedema halo, enhancing rim, necrotic core
    oedema = np.clip((1.7 * radius - rr) / 2.0 + 0.5, 0, 1)
    rim = (rr <= radius) & (rr >= 0.68 * radius)
    core = rr < 0.68 * radius
    value = np.full_like(rr, brain * (1.35 if bright else 0.8))
    value[rim] = 1500.0 if contrast == "t1" else brain * 1.2
    value[core] = brain * (2.2 if bright else 0.3) + (tex[core] - 0.5) * 60
    return oedema, value


def _slice_pixels(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    grade: str | None,
    contrast: str,
    plane: str,
    lesion_scale: float,
    lesion_centre: tuple[float, float],
    lesion_radius: float,
    shape_phase: np.ndarray,
) -> np.ndarray:
    """One uint16 slice: head, ventricles, texture, optional lesion, noise; values in about 0..2000."""
    h, w = shape
    rs = np.random.RandomState(int(rng.integers(2**31)))
    tissue = _TISSUE[contrast]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.01), w / 2 + rng.normal(0, w * 0.01)
    ay, ax = (0.36 * h, 0.43 * w) if plane == "sag" else (0.42 * h, 0.36 * w)
    head_r = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    img = np.zeros(shape, dtype=np.float32)
    img[head_r <= 1.0] = tissue["scalp"]
    brain_mask = head_r <= 0.9
    tex = _texture(shape, rs).astype(np.float32)
    img[brain_mask] = tissue["brain"] * (0.9 + 0.2 * tex[brain_mask])
    vent_r = np.sqrt(((yy - cy) / (0.1 * h)) ** 2 + ((xx - cx) / (0.05 * w)) ** 2)
    img[vent_r <= 1.0] = tissue["csf"]

    if grade is not None and lesion_scale > 0:
        ly, lx = cy + lesion_centre[0] * ay, cx + lesion_centre[1] * ax
        rr = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
        theta = np.arctan2(yy - ly, xx - lx)
        weight, value = _lesion(
            grade, rr, theta, lesion_radius * lesion_scale, tissue["brain"], tex, contrast, shape_phase
        )
        weight = weight * brain_mask
        img = img * (1 - weight) + value * weight

    img += rng.normal(0, 18.0, size=shape).astype(np.float32)
    return np.clip(img, 0, 2000).astype(np.uint16)


def _uid(seed: int, *parts: Any) -> str:
    """Deterministic UUID-derived UID (``2.25.<int>``, <= 44 chars, so suffixes like ".1" stay valid)."""
    digest = hashlib.sha256("|".join(["sdl-glioma-demo", str(seed), *map(str, parts)]).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def _write_patient(
    dicom_dir: Path,
    patient_id: str,
    grade: str,
    index: int,
    *,
    slices_per_series: int,
    image_size: tuple[int, int],
    seed: int,
) -> None:
    rng = np.random.default_rng([seed, index])
    study_uid = _uid(seed, patient_id, "study")
    day, month, year = 1 + index % 28, 1 + index % 12, 1990 + index % 15
    study_dir = dicom_dir / patient_id / f"{month:02d}-{day:02d}-{year}-MRI BRAIN-{int(rng.integers(10000, 99999))}"
    base_radius = {"II": 0.07, "III": 0.13, "IV": 0.12}[grade] * min(image_size) * rng.uniform(0.85, 1.15)
    centre = (float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.4, 0.4)))
    shape_phase = rng.uniform(0, 2 * np.pi, size=2)
    for series in _SERIES:
        n = series.n_slices or slices_per_series
        series_uid = _uid(seed, patient_id, "series", series.number)
        series_dir = study_dir / f"{series.number}.000000-{series.description}-{int(rng.integers(10000, 99999))}"
        for s in range(n):
            # A 3-plane localizer holds one sagittal, one axial and one coronal slice.
            orientation = (SAGITTAL, AXIAL, CORONAL)[s % 3] if series.localizer else series.orientation
            plane = "sag" if orientation == SAGITTAL else "ax"
            # Lesion profile across the series: full size in the middle, ~40 % at the outermost slices.
            offset = (s - (n - 1) / 2) / max((n - 1) / 2, 1)
            scale = 1.0 - 0.6 * offset**2
            drift = (0.02 * offset, 0.03 * offset)
            pixels = _slice_pixels(
                image_size,
                rng,
                grade=grade,
                contrast=series.contrast,
                plane=plane,
                lesion_scale=0.0 if series.localizer else scale,
                lesion_centre=(centre[0] + drift[0], centre[1] + drift[1]),
                lesion_radius=base_radius,
                shape_phase=shape_phase,
            )
            position = (-5.0 * (n - 1) / 2 + 5.0 * s, -120.0, 120.0) if plane == "sag" else (-120, -120, 5.0 * s)
            path = write_mr_slice(
                series_dir / f"1-{s + 1:02d}.dcm",
                pixels,
                patient_id=patient_id,
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series.number,
                instance_number=s + 1,
                series_description=series.description,
                orientation=orientation,
                position=position,
                pixel_spacing=(240.0 / image_size[0], 240.0 / image_size[1]),
                repetition_time=series.tr,
                echo_time=series.te,
                image_type=LOCALIZER_IMAGE_TYPE if series.localizer else ("ORIGINAL", "PRIMARY", "M", "ND"),
                sop_instance_uid=_uid(seed, patient_id, series.number, s),
                patient_name="Demo^Synthetic",
            )
            if series.inversion_time is not None:
                _set_inversion_time(path, series.inversion_time)


def _set_inversion_time(path: Path, inversion_time: float) -> None:
    """write_mr_slice has no TI argument; FLAIR needs one, so add it to the written file."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.InversionTime = inversion_time
    ds.ScanningSequence = "IR"
    ds.save_as(path, enforce_file_format=True)


def generate_demo_dataset(
    root: str | Path,
    *,
    n_patients_per_grade: int = 12,
    slices_per_series: int = 12,
    image_size: tuple[int, int] = (160, 160),
    seed: int = 0,
) -> dict[str, str]:
    """Write the synthetic demo tree under ``root`` and return ``{"dicom_dir": ..., "grades_csv": ...}``.

    Layout: ``<root>/dicom/DEMO-0001/<MM-DD-YYYY-MRI BRAIN-nnnnn>/<k.000000-SAG T1-nnnnn>/1-01.dcm`` and
    ``<root>/grades.csv`` (``Sample,Grade``). Patients ``DEMO-0001..`` cycle through grades II, III, IV;
    one extra patient with images is listed with grade "NA" and one CSV row has no images.
    """
    root = Path(root)
    dicom_dir = root / "dicom"
    image_size = (int(image_size[0]), int(image_size[1]))
    rows = []
    n_graded = n_patients_per_grade * len(DEMO_GRADES)
    for i in range(n_graded):
        grade = DEMO_GRADES[i % len(DEMO_GRADES)]
        patient_id = f"DEMO-{i + 1:04d}"
        notation = _NOTATIONS[grade][(i // len(DEMO_GRADES)) % 2]
        _write_patient(
            dicom_dir, patient_id, grade, i, slices_per_series=slices_per_series, image_size=image_size, seed=seed
        )
        rows.append((patient_id, notation))
    ungraded = f"DEMO-{n_graded + 1:04d}"  # has images, grade unknown -> excluded and reported
    _write_patient(
        dicom_dir, ungraded, "II", n_graded, slices_per_series=slices_per_series, image_size=image_size, seed=seed
    )
    rows.append((ungraded, "NA"))
    rows.append((f"DEMO-{n_graded + 2:04d}", "IV"))  # listed in the CSV, no images

    grades_csv = root / "grades.csv"
    with open(grades_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Sample", "Grade"])
        writer.writerows(rows)
    return {"dicom_dir": str(dicom_dir), "grades_csv": str(grades_csv)}


def default_cache_dir() -> Path:
    """``$SDL_GLIOMA_CACHE/demo`` if the variable is set, else ``~/.cache/sdl_glioma/demo``."""
    base = os.environ.get("SDL_GLIOMA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "sdl_glioma") / "demo"


def _marker_matches(root: Path, settings: dict) -> bool:
    try:
        return json.loads((root / MARKER_NAME).read_text()) == settings
    except (OSError, ValueError):
        return False


def ensure_demo_dataset(cache_dir: str | Path | None = None, **generate_kwargs: Any) -> dict[str, str]:
    """Return the demo dataset paths, generating it into ``cache_dir`` on first use.

    Generation goes to a temporary sibling folder that is renamed into place only when complete (with a
    marker holding the generator version and settings), so an interrupted run never leaves a half tree
    that is later re-used; a stale or foreign tree is replaced. ``generate_kwargs`` are passed to
    :func:`generate_demo_dataset` and are part of the marker.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    settings = {
        "generator_version": GENERATOR_VERSION,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in sorted(generate_kwargs.items())},
    }
    paths = {"dicom_dir": str(root / "dicom"), "grades_csv": str(root / "grades.csv")}
    if _marker_matches(root, settings):
        logger.warning(_SYNTHETIC_WARNING, root)
        return paths

    logger.warning("Generating SYNTHETIC demo data (NOT patient data) into %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    try:
        generate_demo_dataset(tmp, **generate_kwargs)
        (tmp / MARKER_NAME).write_text(json.dumps(settings))
        if root.exists():  # stale version, other settings, or a leftover without marker: replace it
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _marker_matches(root, settings):  # not a concurrent twin that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning(_SYNTHETIC_WARNING, root)
    return paths
