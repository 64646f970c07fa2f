"""Real brain anatomy for the synthetic demo: the ICBM 2009a template, warped per patient and sliced like a scanner.

Every demo patient starts from the same real T1-weighted brain, the ICBM 2009a nonlinear symmetric template
(Fonov et al. 2009/2011; Collins et al. 1999) that the ``nilearn`` wheel ships in ``nilearn/datasets/data/``:
its T1 image and its grey- and white-matter probability maps. The files are read from the installed package,
never copied (nilearn lists their licence as unknown).

A patient is the template under a random affine (head size, tilt, position) and a smooth elastic warp; the
scanner then acquires planes of it. Only the planes a series acquires are sampled, each as a thick slab
(two sub-planes across the slice thickness, averaged, as a 5 mm MR slice averages its tissue), with
``torch.nn.functional.grid_sample`` straight from template space. Warping the whole 1 mm volume with MONAI's
``Rand3DElastic`` and then slicing it would give the same images for about thirty times the work, which
matters because the demo is generated on first use.

The template is skull-stripped. A head is put around it from the distance to the brain: CSF, the skull's
dark inner and outer tables with the marrow between them, muscle, subcutaneous fat and skin, as they look
on T1; below the cerebellum the shell turns into neck soft tissue, and the medulla continues as the cord.

Coordinates: millimetres in RAS (x right, y anterior, z superior). DICOM geometry is LPS; :func:`plane_points`
converts, so the pixels of a written slice sit exactly where its ``ImagePositionPatient`` and
``ImageOrientationPatient`` say.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth
from scipy import ndimage

__all__ = [
    "TEMPLATE_CITATION",
    "TEMPLATE_FILES",
    "PatientGeometry",
    "Template",
    "load_template",
    "plane_points",
    "random_geometry",
    "sample_tissue",
    "template_dir",
]

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TEMPLATE_CITATION = (
    "ICBM 2009a nonlinear symmetric template (Fonov et al., NeuroImage 47 S102, 2009; Fonov et al., NeuroImage "
    "54(1):313-327, 2011; Collins et al., IPMI 1999), as shipped in the nilearn package"
)
_HEAD_GRID_MM = 2.0  # resolution of the distance-to-brain map the head shell is drawn from
_HEAD_MARGIN_MM = 40.0  # room around the template's box for the shell and the neck


def template_dir() -> Path:
    """The folder of the installed ``nilearn`` package that holds the ICBM 2009a files (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo data is drawn on the ICBM 2009a brain template shipped inside the nilearn package, which is "
            "not installed: pip install nilearn (it is a dependency of this bundle: pip install -e .)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {folder.parent.parent} lacks the ICBM 2009a files {missing}")
    return folder


@dataclass(frozen=True)
class Template:
    """The template on its 1 mm grid, ready for sampling.

    ``t1``: T1 scaled so that white matter is 1.0; ``maps``: grey- and white-matter probabilities in 0..1;
    ``head_distance``: distance in mm from the brain, on a coarser grid with a margin; all float32 and stored
    as :func:`_stored` says. ``*_to_grid``: 4x4 affines from RAS mm to ``grid_sample``'s normalised coordinates of
    each volume. ``lesion_sites``: RAS positions of deep cerebral white matter where a glioma may be centred.
    """

    t1: torch.Tensor
    maps: torch.Tensor
    head_distance: torch.Tensor
    tissue_to_grid: np.ndarray
    head_to_grid: np.ndarray
    lesion_sites: np.ndarray
    brain_centre: np.ndarray


def _stored(volume: np.ndarray) -> torch.Tensor:
    """A ``(C, I, J, K)`` volume as stored for sampling: ``(C, I, K, J)``, so that voxels along y (the axis a
    sagittal image row runs along) are contiguous; ``grid_sample``'s 3D CPU kernel is about twice as fast so."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(volume, (0, 1, 3, 2))))


def _to_grid_affine(voxel_to_ras: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """RAS mm -> ``grid_sample`` coordinates (``align_corners=True``) of a volume of ``shape`` (I, J, K) stored
    by :func:`_stored`: the grid's coordinates run along the stored axes from last to first, i.e. (j, k, i)."""
    ras_to_voxel = np.linalg.inv(voxel_to_ras)
    scale = np.diag([2.0 / (n - 1) for n in shape] + [1.0])
    scale[:3, 3] = -1.0
    to_grid = scale @ ras_to_voxel
    return to_grid[[1, 2, 0, 3]]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the template once per process (about a second) and derive what sampling needs."""
    folder = template_dir()
    images = {key: nib.load(folder / name) for key, name in TEMPLATE_FILES.items()}
    affine = images["t1"].affine
    t1, gm, wm = (np.asanyarray(images[k].dataobj).astype(np.float32) for k in ("t1", "gm", "wm"))
    gm, wm = gm / 255.0, wm / 255.0
    white = float(np.median(t1[wm > 0.9]))

    brain = t1 > 0
    # Distance from the brain on a 2 mm grid with a margin, from which the head shell is drawn.
    step = int(_HEAD_GRID_MM)
    pad = int(_HEAD_MARGIN_MM / _HEAD_GRID_MM)
    coarse = np.pad(brain[::step, ::step, ::step], pad)
    coarse[:, :, :pad] = coarse[:, :, pad : pad + 1]  # the medulla continues downwards as the cord
    distance = ndimage.distance_transform_edt(~coarse, sampling=_HEAD_GRID_MM).astype(np.float32)
    head_affine = affine @ np.diag([step, step, step, 1.0])
    head_affine[:3, 3] -= head_affine[:3, :3] @ np.full(3, pad)

    ras = lambda ijk: (affine[:3, :3] @ ijk.T).T + affine[:3, 3]  # noqa: E731
    deep_white = ndimage.binary_erosion(wm > 0.95, iterations=3)
    sites = ras(np.argwhere(deep_white).astype(np.float64))
    # cerebral hemispheres only: off the midline, above the cerebellum and brainstem
    sites = sites[(np.abs(sites[:, 0]) > 12) & (sites[:, 2] > -5)]
    centre = ras(np.argwhere(brain).mean(0, keepdims=True).astype(np.float64))[0]
    return Template(
        t1=_stored((t1 / white)[None]),
        maps=_stored(np.stack([gm, wm])),
        head_distance=_stored(distance[None]),
        tissue_to_grid=_to_grid_affine(affine, t1.shape),
        head_to_grid=_to_grid_affine(head_affine, coarse.shape),
        lesion_sites=sites,
        brain_centre=centre,
    )


@dataclass(frozen=True)
class PatientGeometry:
    """Where a patient's head is and how its anatomy differs from the template.

    ``template_from_patient``: 4x4 affine from the patient's RAS mm (scanner space) to template RAS mm
    (head size, tilt and position). ``warp``: ``(3, a, b, c)`` smooth displacement in mm on a lattice over the
    template's box, added after the affine (individual shape). ``skull``: thickness factor of the head shell.
    """

    template_from_patient: np.ndarray
    warp: torch.Tensor
    skull: float


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_WARP_LATTICE = (12, 12, 14)  # nodes over the template box (about 17 mm apart), in stored axis order
_WARP_SMOOTH = GaussianSmooth(sigma=1.2)


def random_geometry(rng: np.random.Generator, *, warp_mm: float = 3.0) -> PatientGeometry:
    """A random patient: head size 0.9-1.1 (per axis within 4 % of each other), tilt up to 8 degrees in the
    sagittal plane and 3 degrees out of it, a shift of a few mm, and an elastic warp of about ``warp_mm`` mm."""
    size = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)
    angles = (rng.uniform(-8, 8), rng.uniform(-3, 3), rng.uniform(-3, 3))
    shift = rng.uniform(-1, 1, size=3) * np.array([3.0, 6.0, 6.0])
    patient_from_template = np.eye(4)
    patient_from_template[:3, :3] = _rotation(angles) @ np.diag(size)
    patient_from_template[:3, 3] = shift
    noise = torch.from_numpy(rng.standard_normal((3, *_WARP_LATTICE)).astype(np.float32))
    warp = torch.as_tensor(_WARP_SMOOTH(noise)).as_subclass(torch.Tensor)  # a plain tensor, not a MetaTensor
    warp = warp * (warp_mm / warp.std().clamp_min(1e-6))
    return PatientGeometry(
        template_from_patient=np.linalg.inv(patient_from_template), warp=warp, skull=float(rng.uniform(0.85, 1.2))
    )


def plane_points(
    position_lps: Sequence[float],
    orientation: Sequence[float],
    shape: tuple[int, int],
    spacing: float,
    offsets: Sequence[float] = (0.0,),
) -> torch.Tensor:
    """RAS positions ``(len(offsets), rows, cols, 3)`` of a DICOM plane's pixel centres, each sub-plane shifted
    by an offset (mm) along the plane's normal.

    ``position_lps``/``orientation`` are ``ImagePositionPatient``/``ImageOrientationPatient``: pixel (r, c)
    lies at ``position + c * spacing * row_direction + r * spacing * column_direction`` (LPS).
    """
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    rows, cols = shape
    r = np.arange(rows, dtype=np.float64)[:, None, None]
    c = np.arange(cols, dtype=np.float64)[None, :, None]
    base = np.asarray(position_lps, dtype=np.float64) + c * spacing * row_dir + r * spacing * col_dir
    lps = np.stack([base + o * normal for o in offsets])
    ras = lps * np.array([-1.0, -1.0, 1.0])
    return torch.from_numpy(ras.astype(np.float32))


def _apply_affine(affine: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    matrix = torch.from_numpy(affine[:3, :3].T.astype(np.float32))
    offset = torch.from_numpy(affine[:3, 3].astype(np.float32))
    return torch.addmm(offset, points.reshape(-1, 3), matrix).reshape(points.shape)


def _sample(volume: torch.Tensor, to_grid: np.ndarray, points: torch.Tensor, padding: str) -> torch.Tensor:
    """Trilinear samples ``(C, *points.shape[:-1])`` of a ``(C, I, J, K)`` volume at RAS points."""
    grid = _apply_affine(to_grid, points).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(volume.shape[0], *points.shape[:-1])


def to_template(points: torch.Tensor, geometry: PatientGeometry, template: Template) -> torch.Tensor:
    """Patient RAS points ``(..., rows, cols, 3)`` on planes -> template RAS points: the affine, then the warp.

    The warp is smooth over its ~17 mm lattice, so it is sampled on at most 33 x 33 points of each plane and
    interpolated bilinearly to every pixel, which costs a fraction of sampling it at each one.
    """
    moved = _apply_affine(geometry.template_from_patient, points)
    *lead, rows, cols, _ = moved.shape
    r = torch.linspace(0, rows - 1, min(rows, 33)).round().long()
    c = torch.linspace(0, cols - 1, min(cols, 33)).round().long()
    coarse = moved[..., r[:, None], c[None, :], :]
    # the warp lattice spans the template's box, so it shares the tissue volume's grid coordinates
    displacement = _sample(geometry.warp, template.tissue_to_grid, coarse, padding="border")
    displacement = displacement.reshape(3, -1, len(r), len(c)).transpose(0, 1)
    displacement = F.interpolate(displacement, size=(rows, cols), mode="bilinear", align_corners=True)
    return moved + displacement.permute(0, 2, 3, 1).reshape(*lead, rows, cols, 3)


# T1 head shell around the brain: (distance from the brain in mm, intensity with white matter = 1).
_SHELL_T1 = (
    (0.0, 0.30),  # CSF
    (1.5, 0.30),
    (2.5, 0.06),  # inner table of the skull
    (3.5, 0.06),
    (4.5, 0.60),  # diploe (marrow fat)
    (6.0, 0.60),
    (7.0, 0.06),  # outer table
    (8.0, 0.06),
    (9.0, 0.45),  # galea and muscle
    (10.0, 1.05),  # subcutaneous fat
    (14.0, 1.00),
    (15.0, 0.45),  # skin
    (16.5, 0.0),  # air
)
_NECK_T1 = ((0.0, 0.45), (24.0, 0.50), (26.0, 1.00), (31.0, 0.95), (32.5, 0.45), (34.0, 0.0))
_NECK_TOP_MM = -40.0  # template z below which the shell turns into neck


def sample_tissue(
    points: torch.Tensor, template: Template, skull: float = 1.0, maps: bool = True
) -> dict[str, torch.Tensor]:
    """Template tissue at template RAS points, each shaped like ``points[..., 0]``: ``t1`` (brain from the
    template, head shell around it) and ``head`` (the head's soft tissue and bone, 0 in the brain and in air);
    with ``maps``, also ``gm``, ``wm`` and ``csf`` (the rest of the brain mask).

    Below the template's lowest slice the medulla is extended downwards (border padding), as the cord.
    """
    t1 = _sample(template.t1, template.tissue_to_grid, points, padding="border")[0]
    distance = _sample(template.head_distance, template.head_to_grid, points, padding="border")[0]
    depth = distance / skull
    shell = torch.from_numpy(np.interp(depth.numpy(), *map(np.array, zip(*_SHELL_T1, strict=True))).astype(np.float32))
    neck = torch.from_numpy(np.interp(distance.numpy(), *map(np.array, zip(*_NECK_T1, strict=True))).astype(np.float32))
    to_neck = torch.sigmoid((_NECK_TOP_MM - points[..., 2]) / 6.0)
    shell = shell * (1 - to_neck) + neck * to_neck
    inside = (1.0 - distance / _HEAD_GRID_MM).clamp(0.0, 1.0)  # the brain mask, softened at its edge
    brain_t1 = torch.maximum(t1, 0.3 * inside)  # stripped edge voxels: fill with CSF, not black
    tissue = {"t1": inside * brain_t1 + (1 - inside) * shell, "head": (1 - inside) * (shell > 0.02).float()}
    if maps:
        gm, wm = _sample(template.maps, template.tissue_to_grid, points, padding="border") * inside
        tissue.update(gm=gm, wm=wm, csf=(inside - gm - wm).clamp(0.0, 1.0))
    return tissue
