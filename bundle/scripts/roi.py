"""Grading on the tumour region (``--roi mask``): each slice cropped to a square around its lesion, from a mask.

The transfer-learning glioma study graded a rectangle around the tumour rather than the whole slice. On the demo
data that is the difference between learning and not: from random weights, an AlexNet branch fits whole slices
only by recognising each training patient (most slices show no tumour yet carry the grade), while on crops
around the tumour it learns the tumour's look within a few hundred steps (README, Results). The crop needs the
lesion's position, which here comes from a mask per slice; grading new slices without masks needs a segmenter,
which this bundle does not have yet, so `run inference` refuses a model trained on regions
(:func:`require_whole_slice_model`).

* :func:`roi_records` keeps the slices whose mask shows at least ``min_tumour_pixels`` tumour pixels (label 1)
  and adds the mask's path under ``"mask"``; the masks come from a CSV (``sop_instance_uid``, ``mask``,
  ``tumour_pixels``), which is what the demo writes (``masks/masks.csv``); a mask is a PNG with the slice's rows
  and columns, 1 where the tumour is.
* :func:`roi_transforms` is the part of the preprocessing chain that crops: a square of ``roi_fraction`` of the
  resized slice's side, centred on the tumour's bounding box (MONAI's ``CropForegroundd`` then
  ``ResizeWithPadOrCropd``), resized back to the network's input size. A fixed fraction keeps the tumour's size,
  one of the grades' cues, visible to the network.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import CropForegroundd, DeleteItemsd, Resized, ResizeWithPadOrCropd

__all__ = ["ROI_MODES", "find_masks_csv", "require_whole_slice_model", "roi_records", "roi_transforms"]

logger = logging.getLogger(__name__)

ROI_MODES = ("none", "mask")
TUMOUR_LABEL = 1
MASK_KEY = "mask"


def _check_mode(roi: str) -> str:
    if roi not in ROI_MODES:
        raise ValueError(f"roi must be one of {ROI_MODES}, got {roi!r}")
    return roi


def find_masks_csv(records: Sequence[Mapping[str, Any]]) -> Path | None:
    """The masks CSV of the demo tree the records' slices come from (its ``demo_info.json`` names it), or None."""
    from scripts.demo_data import find_demo_info

    info = find_demo_info(str(records[0].get("image_path", records[0]["image"]))) if records else None
    return info.parent / json.loads(info.read_text())["masks_csv"] if info else None


def _read_masks(masks_csv: Path) -> dict[str, tuple[str, int]]:
    with open(masks_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"sop_instance_uid", "mask", "tumour_pixels"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"masks CSV {masks_csv} lacks the columns {sorted(missing)}")
    return {r["sop_instance_uid"]: (str(_mask_path(masks_csv, r["mask"])), int(r["tumour_pixels"])) for r in rows}


def _mask_path(masks_csv: Path, mask: str) -> Path:
    """A mask path as written in the CSV: absolute, relative to the CSV's folder, or (the demo's layout,
    ``masks/<PatientID>/<SOPInstanceUID>.png`` in ``masks/masks.csv``) relative to the folder above it."""
    path = Path(mask)
    if path.is_absolute():
        return path
    beside = masks_csv.parent / path
    return beside if beside.exists() else masks_csv.parent.parent / path


def roi_records(
    records: Sequence[dict],
    roi: str = "none",
    masks_csv: str | Path | None = None,
    min_tumour_pixels: int = 20,
) -> list[dict]:
    """``records`` unchanged for ``roi="none"``; for ``"mask"``, those whose mask shows the tumour, with ``"mask"``.

    ``masks_csv`` defaults to the demo tree's ``masks/masks.csv``; real data needs one (a clear error without).
    Slices without a mask row or with fewer than ``min_tumour_pixels`` tumour pixels are left out and counted.
    """
    if _check_mode(roi) == "none":
        return list(records)
    path = Path(masks_csv) if masks_csv else find_masks_csv(records)
    if path is None or not path.is_file():
        where = f"{path} was not found" if path else "the slices are not in a demo tree, which brings its own"
        raise FileNotFoundError(
            f"--roi mask needs lesion masks: give --masks_csv (columns sop_instance_uid, mask, tumour_pixels); {where}"
        )
    masks = _read_masks(path)
    kept = []
    for record in records:
        mask, pixels = masks.get(str(record.get("sop_instance_uid")), (None, 0))
        if mask is not None and pixels >= int(min_tumour_pixels):
            kept.append({**record, MASK_KEY: mask})
    if not kept:
        raise ValueError(f"--roi mask: no slice has at least {min_tumour_pixels} tumour pixels in {path}")
    patients = {r["patient_id"] for r in kept}
    logger.info(
        "--roi mask: %d of %d slices show the tumour (masks %s), %d patients; the others are not graded",
        len(kept), len(records), path, len(patients),
    )  # fmt: skip
    return kept


def _is_tumour(mask: Any) -> Any:
    return mask == TUMOUR_LABEL


def roi_transforms(image_size: int, roi_fraction: float, keys: Sequence[str] = ("image",)) -> list:
    """Crop each (already resized) slice to a ``roi_fraction`` square around its tumour, back to ``image_size``.

    Expects the mask under ``"mask"``, loaded and resized with the slice; removes it after the crop, so batches
    hold the images only.
    """
    if not 0 < float(roi_fraction) <= 1:
        raise ValueError(f"roi_fraction must be in (0, 1], got {roi_fraction}")
    side = max(8, round(float(roi_fraction) * int(image_size)))
    keys = list(keys)
    return [
        # the box of the tumour grown by half a side each way, so the square below holds real tissue, not padding
        CropForegroundd(
            keys=[*keys, MASK_KEY], source_key=MASK_KEY, select_fn=_is_tumour, margin=side // 2, allow_smaller=True
        ),  # fmt: skip
        ResizeWithPadOrCropd(keys=keys, spatial_size=(side, side), mode="edge"),
        Resized(keys=keys, spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=False),
        DeleteItemsd(keys=MASK_KEY),
    ]


def require_whole_slice_model(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """Refuse to grade new slices with a model trained on tumour regions: there is no mask for them."""
    if settings.get("roi", "none") != "none":
        raise ValueError(
            "this model was trained on tumour regions (--roi mask) and needs each slice's lesion mask; grading new "
            "slices without masks needs a segmenter, which this bundle does not have yet. Grade a datalist with "
            "masks through `run evaluating --masks_csv CSV` instead."
        )
    return settings
