"""The embedded demo dataset: a SYNTHETIC, REMBRANDT-shaped DICOM tree of gliomas on real T1 brain anatomy.

It lets the whole bundle (indexing, training, evaluation, reporting) run end to end without downloading
patient data, and it exercises what the real collection throws at the pipeline: several series per study of
which only the sagittal T1 is used, a 3-plane localizer, TCIA folder names, mixed grade notations ("II", "3",
"GBM"), a patient without a grade and a CSV row without images.

Every patient is the ICBM 2009a brain (``scripts.demo_anatomy``) with its own head size, tilt, position and
elastic warp, and its own scanner (MONAI's bias field, gamma contrast, intensity scale and Rician noise), so
that patients differ the way real patients and scanners do and a model can recognise a patient from its
anatomy: under a slice-level split that is a leak that inflates accuracy, which this data lets one measure.
Each carries one glioma in cerebral white matter (``scripts.demo_lesions``). The SAG T1 series has
``slices_per_series`` 5 mm slices 6 mm apart; slices beside the tumour show little or none of it, yet carry
the patient's grade, as in the real collection.

**The difficulty knob and the known ceiling.** A share ``mimic_fraction`` of each grade's patients has a lesion
that looks like a neighbouring grade (II -> III, IV -> III, III -> II or IV): its images are drawn exactly as
those of the grade it looks like. Grade reaches the pixels only through the lesion's kind, so no rule that
sees the images can beat the rule that knows each patient's lesion kind and answers the grade most patients
of that kind have. That rule's accuracy, over the generated cohort, is written to ``demo_info.json`` as
``ceiling_accuracy_patient`` (per patient) and ``ceiling_accuracy_slice`` (per slice): about 0.9 by default.
The slice figure is an upper bound that lesion-free slices keep out of reach (``slices_with_lesion``).

Files under ``root``: ``dicom/DEMO-0001/<study>/<series>/1-01.dcm``, ``grades.csv`` (``Sample,Grade``),
``demo_info.json`` (settings, ceilings, each patient's grade and lesion), and the lesion masks of the SAG T1
slices, ``masks/<PatientID>/<SOPInstanceUID>.png`` (the slice's rows x columns; 0 background, 1 tumour, 2
oedema) listed in ``masks/masks.csv``. Everything is deterministic in ``seed``; nothing here is patient data.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandRicianNoise, RandScaleIntensity
from monai.utils import convert_to_tensor
from PIL import Image

from scripts.demo_anatomy import (
    TEMPLATE_CITATION,
    PatientGeometry,
    Template,
    load_template,
    plane_points,
    random_geometry,
    sample_tissue,
    to_template,
)
from scripts.demo_lesions import Lesion, draw_lesion, render
from scripts.synthetic_dicom import AXIAL, CORONAL, LOCALIZER_IMAGE_TYPE, SAGITTAL, write_mr_slice

__all__ = [
    "DEMO_GRADES",
    "GENERATOR_VERSION",
    "INFO_NAME",
    "MARKER_NAME",
    "DemoPatient",
    "ceiling_accuracy",
    "default_cache_dir",
    "demo_cohort",
    "ensure_demo_dataset",
    "find_demo_info",
    "generate_demo_dataset",
    "render_series",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "2"
MARKER_NAME = ".sdl_demo_complete.json"
INFO_NAME = "demo_info.json"
DEMO_GRADES = ("II", "III", "IV")
# Notations cycled per patient, as REMBRANDT's clinical tables mix them.
_NOTATIONS = {"II": ("II", "2"), "III": ("III", "3"), "IV": ("IV", "GBM")}
_SYNTHETIC_WARNING = "Using SYNTHETIC demo data (generated images, NOT patient data) at %s"
_FIELD_OF_VIEW_MM = 240.0
_SIGNAL_GAIN = 1000.0  # white matter's stored value before the scanner's own intensity scale
MASK_LABELS = {"background": 0, "tumour": 1, "oedema": 2}


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
    spacing: float = 6.0  # mm between slice centres
    thickness: float = 5.0


_SERIES = (
    _Series(1, "3-PLANE LOC", SAGITTAL, 8.6, 1.6, "t1", n_slices=3, localizer=True, thickness=10.0),
    _Series(2, "AX T1", AXIAL, 550.0, 12.0, "t1", n_slices=3, spacing=20.0),
    _Series(3, "SAG T1", SAGITTAL, 500.0, 15.0, "t1"),
    _Series(4, "AX T2", AXIAL, 4000.0, 100.0, "t2", n_slices=3, spacing=20.0),
    _Series(5, "AX FLAIR", AXIAL, 9000.0, 140.0, "flair", n_slices=3, inversion_time=2500.0, spacing=20.0),
    _Series(6, "SAG T2", SAGITTAL, 4200.0, 102.0, "t2", n_slices=2, spacing=20.0),
)
_GRADED_SERIES = 3  # SAG T1: the series the bundle grades, with lesion masks


@dataclass(frozen=True)
class DemoPatient:
    """A demo patient: the clinical ``grade`` (None: not in the grade table) and the ``lesion_kind`` its images
    show, which differs from the grade for the difficulty knob's mimics."""

    index: int
    patient_id: str
    grade: str | None
    lesion_kind: str

    @property
    def mimic(self) -> bool:
        return self.grade is not None and self.grade != self.lesion_kind


def _mimic_kind(grade: str, turn: int) -> str:
    """The neighbouring grade a mimic looks like: II -> III, IV -> III, III -> II and IV in turn."""
    if grade == "III":
        return ("II", "IV")[turn % 2]
    return "III"


def demo_cohort(n_patients_per_grade: int, mimic_fraction: float, seed: int) -> list[DemoPatient]:
    """The graded patients (``DEMO-0001``... cycling II, III, IV), then one patient the grade table calls "NA".

    In each grade, ``round(mimic_fraction * n_patients_per_grade)`` patients, picked at random from ``seed``,
    have a lesion that looks like a neighbouring grade.
    """
    if not 0.0 <= mimic_fraction <= 1.0:
        raise ValueError(f"mimic_fraction must be in [0, 1], got {mimic_fraction}")
    rng = np.random.default_rng([seed, 1])
    n_mimics = int(np.floor(mimic_fraction * n_patients_per_grade + 0.5))
    patients = []
    indices = {g: [i for i in range(n_patients_per_grade * 3) if i % 3 == k] for k, g in enumerate(DEMO_GRADES)}
    kinds: dict[int, str] = {}
    for grade, members in indices.items():
        for turn, i in enumerate(sorted(rng.choice(members, size=n_mimics, replace=False).tolist())):
            kinds[i] = _mimic_kind(grade, turn)
    for i in range(n_patients_per_grade * 3):
        grade = DEMO_GRADES[i % 3]
        patients.append(DemoPatient(i, f"DEMO-{i + 1:04d}", grade, kinds.get(i, grade)))
    n = len(patients)
    patients.append(DemoPatient(n, f"DEMO-{n + 1:04d}", None, "II"))
    return patients


def ceiling_accuracy(grades: Sequence[str], kinds: Sequence[str], weights: Sequence[float] | None = None) -> float:
    """Accuracy of the best rule that knows each case's lesion kind: answer the grade most common for that kind.

    Images depend on the grade only through the kind, so this is the best accuracy any image-based rule
    can expect on these cases. ``weights``: e.g. each patient's number of slices, for the slice-level figure.
    """
    weights = [1.0] * len(grades) if weights is None else [float(w) for w in weights]
    mass: Counter = Counter()
    for grade, kind, weight in zip(grades, kinds, weights, strict=True):
        mass[(kind, grade)] += weight
    best = {}
    for kind in {k for k, _ in mass}:
        # ties go to the kind's own grade
        best[kind] = max(DEMO_GRADES, key=lambda g, k=kind: (mass[(k, g)], g == k))
    right = sum(w for g, k, w in zip(grades, kinds, weights, strict=True) if best[k] == g)
    return right / sum(weights)


@dataclass(frozen=True)
class _Scanner:
    """One patient's scanner: MONAI's random intensity transforms with this patient's seed."""

    seed: int

    def apply(self, stack: torch.Tensor, series_number: int) -> torch.Tensor:
        """Coil bias, gamma contrast, intensity scale and Rician noise over a series ``(slices, rows, cols)``."""
        chain = Compose(
            [
                RandBiasField(degree=3, coeff_range=(0.0, 0.12), prob=1.0),
                RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25)),
                RandScaleIntensity(factors=(-0.25, 0.25), prob=1.0),
                RandRicianNoise(prob=1.0, std=0.045, sample_std=True),
            ]
        )
        chain.set_random_state(seed=self.seed)  # the same bias, contrast and scale in every series...
        noise = chain.transforms[-1]
        noise.set_random_state(seed=(self.seed + series_number) % 2**32)  # ...independent noise
        return convert_to_tensor(chain(stack[None]), track_meta=False)[0]


def _contrast_base(tissue: dict[str, torch.Tensor], contrast: str) -> torch.Tensor:
    """Tissue signal with white matter = 1: T1 from the template itself, T2/FLAIR mixed from the tissue maps."""
    if contrast == "t1":
        return tissue["t1"]
    gm, wm, csf, head = tissue["gm"], tissue["wm"], tissue["csf"], tissue["head"]
    if contrast == "t2":
        return 0.55 * wm + 0.8 * gm + 2.0 * csf + 0.8 * head * tissue["t1"]
    return 0.6 * wm + 0.85 * gm + 0.12 * csf + 0.7 * head * tissue["t1"]  # FLAIR


def render_series(
    positions_lps: Sequence[Sequence[float]],
    orientation: Sequence[float],
    shape: tuple[int, int],
    spacing: float,
    *,
    thickness: float,
    contrast: str,
    geometry: PatientGeometry,
    lesion: Lesion | None,
    template: Template | None = None,
    slab: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free signal ``(slices, rows, cols)`` (white matter = 1) of the planes at ``positions_lps`` and their
    lesion masks (``MASK_LABELS``), each slice the mean of two sub-planes across ``thickness`` (``slab=False``:
    the centre plane alone, for the series the bundle never grades)."""
    template = template or load_template()
    offsets = (-thickness / 4, thickness / 4) if slab else (0.0,)
    points = torch.stack([plane_points(p, orientation, shape, spacing, offsets) for p in positions_lps])
    points = to_template(points, geometry, template)
    source = points
    parts = None
    if lesion is not None:
        near = (points - torch.from_numpy(lesion.centre.astype(np.float32))).norm(dim=-1) < lesion.reach
        source = points.clone()
        source[near] = lesion.displace(points[near])
        parts = lesion.components(points[near])
    tissue = sample_tissue(source, template, geometry.skull, maps=contrast != "t1")
    signal = _contrast_base(tissue, contrast)
    mask = torch.zeros(signal.shape[0], *signal.shape[2:], dtype=torch.uint8)
    if parts is not None:
        signal[near] = render(signal[near], lesion.kind, parts, contrast)
        tumour, oedema = torch.zeros_like(signal), torch.zeros_like(signal)
        tumour[near], oedema[near] = parts["tumour"], parts["oedema"]
        mask[oedema.mean(1) >= 0.5] = MASK_LABELS["oedema"]
        mask[tumour.mean(1) >= 0.5] = MASK_LABELS["tumour"]
    return signal.mean(1), mask


def _uid(seed: int, *parts: Any) -> str:
    """Deterministic UUID-derived UID (``2.25.<int>``, <= 44 chars, so suffixes like ".1" stay valid)."""
    digest = hashlib.sha256("|".join(["sdl-glioma-demo", str(seed), *map(str, parts)]).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def _series_positions(
    series: _Series, n: int, centre_ras: np.ndarray, shape: tuple[int, int], spacing: float
) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """(ImagePositionPatient, ImageOrientationPatient) of each slice: planes centred on ``centre_ras``, stepped
    along their normal. A 3-plane localizer holds one sagittal, one axial and one coronal slice."""
    out = []
    centre_lps = centre_ras * np.array([-1.0, -1.0, 1.0])
    rows, cols = shape
    for s in range(n):
        orientation = (SAGITTAL, AXIAL, CORONAL)[s % 3] if series.localizer else series.orientation
        row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
        step = 0.0 if series.localizer else (s - (n - 1) / 2) * series.spacing
        corner = centre_lps + step * np.cross(row_dir, col_dir)
        corner = corner - (cols - 1) / 2 * spacing * row_dir - (rows - 1) / 2 * spacing * col_dir
        out.append((tuple(float(v) for v in corner), tuple(orientation)))
    return out


def _lesion_sites(template: Template, half_coverage: float) -> np.ndarray:
    """White-matter sites a lesion may be centred at: 12-45 mm off the midline, inside the series' coverage."""
    distance = np.abs(template.lesion_sites[:, 0])
    inside = template.lesion_sites[(distance >= 12) & (distance <= min(45.0, half_coverage + 6.0))]
    if len(inside):
        return inside
    return template.lesion_sites[distance <= np.min(distance) + 4.0]  # a short series: as near the midline as any


def _write_patient(
    root: Path,
    patient: DemoPatient,
    *,
    slices_per_series: int,
    image_size: tuple[int, int],
    seed: int,
) -> dict:
    """Write one patient's study (and SAG T1 masks); return its ``demo_info.json`` entry."""
    template = load_template()
    rng = np.random.default_rng([seed, patient.index])
    geometry = random_geometry(rng)
    half_coverage = (slices_per_series - 1) / 2 * _SERIES[_GRADED_SERIES - 1].spacing
    lesion = draw_lesion(patient.lesion_kind, rng, _lesion_sites(template, half_coverage))
    scanner = _Scanner(int(rng.integers(2**31)))
    patient_from_template = np.linalg.inv(geometry.template_from_patient)
    centre = patient_from_template[:3, :3] @ template.brain_centre + patient_from_template[:3, 3]
    centre = centre + rng.uniform(-1, 1, size=3) * np.array([3.0, 5.0, 5.0])  # where the technician put the box
    spacing = _FIELD_OF_VIEW_MM / max(image_size)
    study_uid = _uid(seed, patient.patient_id, "study")
    day, month, year = 1 + patient.index % 28, 1 + patient.index % 12, 1990 + patient.index % 15
    study_dir = f"{month:02d}-{day:02d}-{year}-MRI BRAIN-{int(rng.integers(10000, 99999))}"
    study_dir = root / "dicom" / patient.patient_id / study_dir
    masks = []
    for series in _SERIES:
        n = series.n_slices or slices_per_series
        series_uid = _uid(seed, patient.patient_id, "series", series.number)
        series_dir = study_dir / f"{series.number}.000000-{series.description}-{int(rng.integers(10000, 99999))}"
        planes = _series_positions(series, n, centre, image_size, spacing)
        signal, mask = [], []
        groups = [planes[i : i + 1] for i in range(n)] if series.localizer else [planes]  # one orientation each
        for group in groups:
            s, m = render_series(
                [position for position, _ in group],
                group[0][1],
                image_size,
                spacing,
                thickness=series.thickness,
                contrast=series.contrast,
                geometry=geometry,
                lesion=lesion,
                template=template,
                slab=series.number == _GRADED_SERIES,
            )
            signal.append(s)
            mask.append(m)
        masks_of_series = torch.cat(mask)
        pixels = scanner.apply(torch.cat(signal), series.number) * _SIGNAL_GAIN
        pixels = pixels.clamp(0, 4095).round().to(torch.int32).numpy().astype(np.uint16)
        for s, (position, orientation) in enumerate(planes):
            sop_uid = _uid(seed, patient.patient_id, series.number, s)
            path = write_mr_slice(
                series_dir / f"1-{s + 1:02d}.dcm",
                pixels[s],
                patient_id=patient.patient_id,
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series.number,
                instance_number=s + 1,
                series_description=series.description,
                orientation=orientation,
                position=position,
                pixel_spacing=(spacing, spacing),
                slice_thickness=series.thickness,
                repetition_time=series.tr,
                echo_time=series.te,
                image_type=LOCALIZER_IMAGE_TYPE if series.localizer else ("ORIGINAL", "PRIMARY", "M", "ND"),
                sop_instance_uid=sop_uid,
                patient_name="Demo^Synthetic",
            )
            if series.inversion_time is not None:
                _set_inversion_time(path, series.inversion_time)
            if series.number == _GRADED_SERIES:
                mask_path = root / "masks" / patient.patient_id / f"{sop_uid}.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks_of_series[s].numpy()).save(mask_path)
                masks.append(
                    {
                        "patient_id": patient.patient_id,
                        "sop_instance_uid": sop_uid,
                        "image": path.relative_to(root).as_posix(),
                        "mask": mask_path.relative_to(root).as_posix(),
                        "tumour_pixels": int((masks_of_series[s] == MASK_LABELS["tumour"]).sum()),
                        "oedema_pixels": int((masks_of_series[s] == MASK_LABELS["oedema"]).sum()),
                    }
                )
    return {
        "patient_id": patient.patient_id,
        "grade": patient.grade,
        "lesion_kind": patient.lesion_kind,
        "mimic": patient.mimic,
        "lesion_centre_template_mm": [round(float(v), 1) for v in lesion.centre],
        "lesion_radius_mm": round(lesion.radius, 1),
        "slices": slices_per_series,
        "slices_with_lesion": sum(1 for m in masks if m["tumour_pixels"] + m["oedema_pixels"] > 0),
        "masks": masks,
    }


def _set_inversion_time(path: Path, inversion_time: float) -> None:
    """write_mr_slice has no TI argument; FLAIR needs one, so add it to the written file."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.InversionTime = inversion_time
    ds.ScanningSequence = "IR"
    ds.save_as(path, enforce_file_format=True)


def _write_info(root: Path, entries: list[dict], settings: dict) -> None:
    graded = [e for e in entries if e["grade"] is not None]
    grades, kinds = [e["grade"] for e in graded], [e["lesion_kind"] for e in graded]
    rows = [m for e in entries for m in e.pop("masks")]
    with open(root / "masks" / "masks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_slices = sum(e["slices"] for e in graded)
    info = {
        "synthetic": True,
        "warning": "SYNTHETIC images generated from a brain template; NOT patient data.",
        "generator_version": GENERATOR_VERSION,
        "settings": settings,
        "template": TEMPLATE_CITATION,
        "ceiling_accuracy_patient": round(ceiling_accuracy(grades, kinds), 4),
        "ceiling_accuracy_slice": round(ceiling_accuracy(grades, kinds, [e["slices"] for e in graded]), 4),
        "ceiling_rule": "answer, for each lesion kind, the grade most patients with that kind have",
        "slices_with_lesion": round(sum(e["slices_with_lesion"] for e in graded) / n_slices, 4),
        "mimics": sum(1 for e in graded if e["mimic"]),
        "masks_csv": "masks/masks.csv",
        "mask_labels": MASK_LABELS,
        "patients": entries,
    }
    (root / INFO_NAME).write_text(json.dumps(info, indent=1))


def generate_demo_dataset(
    root: str | Path,
    *,
    n_patients_per_grade: int = 12,
    slices_per_series: int = 20,
    image_size: tuple[int, int] = (256, 256),
    mimic_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, str]:
    """Write the synthetic demo tree under ``root``; return the paths ``dicom_dir``, ``grades_csv`` and ``info``.

    Patients ``DEMO-0001..`` cycle through grades II, III, IV; one more patient with images is listed with grade
    "NA" and one CSV row has no images. ``image_size`` is (rows, columns) of every slice, over a 240 mm field
    of view. See the module docstring for the layout and ``mimic_fraction``.
    """
    root = Path(root)
    image_size = (int(image_size[0]), int(image_size[1]))
    patients = demo_cohort(n_patients_per_grade, mimic_fraction, seed)
    entries = [
        _write_patient(root, p, slices_per_series=slices_per_series, image_size=image_size, seed=seed) for p in patients
    ]
    rows = []
    for p in patients:
        notation = "NA" if p.grade is None else _NOTATIONS[p.grade][(p.index // len(DEMO_GRADES)) % 2]
        rows.append((p.patient_id, notation))
    rows.append((f"DEMO-{len(patients) + 1:04d}", "IV"))  # listed in the CSV, no images
    grades_csv = root / "grades.csv"
    with open(grades_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Sample", "Grade"])
        writer.writerows(rows)
    settings = {
        "n_patients_per_grade": n_patients_per_grade,
        "slices_per_series": slices_per_series,
        "image_size": list(image_size),
        "mimic_fraction": mimic_fraction,
        "seed": seed,
    }
    _write_info(root, entries, settings)
    return _paths(root)


def _paths(root: Path) -> dict[str, str]:
    return {"dicom_dir": str(root / "dicom"), "grades_csv": str(root / "grades.csv"), "info": str(root / INFO_NAME)}


def find_demo_info(path: str | Path) -> Path | None:
    """The ``demo_info.json`` of the demo tree that holds ``path`` (a slice, a mask), searched upwards; None
    outside a demo tree. How experiments find the demo's ceiling and its lesion masks from a datalist."""
    for folder in Path(path).parents:
        info = folder / INFO_NAME
        if info.is_file():
            return info
    return None


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
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(generate_demo_dataset).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }  # so a setting given at its default value matches a tree generated without it
    settings = {
        "generator_version": GENERATOR_VERSION,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in sorted({**defaults, **generate_kwargs}.items())},
    }
    if _marker_matches(root, settings):
        logger.warning(_SYNTHETIC_WARNING, root)
        return _paths(root)

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
    return _paths(root)
