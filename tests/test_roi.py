"""Grading on the tumour region (--roi mask): which slices are kept, where the crop falls, and who refuses it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts.roi import find_masks_csv, require_whole_slice_model, roi_records
from scripts.synthetic_dicom import write_mr_slice
from scripts.transforms import preprocessing_transforms, training_transforms

UIDS = {"patient_id": "P1", "study_uid": "1.2.3", "series_uid": "1.2.3.4"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _slice_with_tumour(folder: Path, name: str, rows: slice, columns: slice, shape=(96, 128)) -> dict:
    """A DICOM slice, dark with a bright square (the 'tumour') at ``rows`` x ``columns``, and its mask PNG."""
    pixels = np.full(shape, 100, dtype=np.uint16)
    pixels[rows, columns] = 1000
    image = write_mr_slice(folder / f"{name}.dcm", pixels, **UIDS, sop_instance_uid=f"1.2.3.4.{len(name)}{name[-1]}")
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows, columns] = 1
    (folder / "masks").mkdir(exist_ok=True)
    Image.fromarray(mask).save(folder / "masks" / f"{name}.png")
    return {"image": str(image), "label": 1, "patient_id": "P1", "sop_instance_uid": f"1.2.3.4.{len(name)}{name[-1]}",
            "mask_file": f"{name}.png", "tumour_pixels": int(mask.sum())}  # fmt: skip


def _masks_csv(folder: Path, slices: list[dict]) -> Path:
    path = folder / "masks" / "masks.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sop_instance_uid", "mask", "tumour_pixels"])
        for s in slices:
            writer.writerow([s["sop_instance_uid"], s["mask_file"], s["tumour_pixels"]])
    return path


def test_the_crop_is_a_square_around_the_tumour_and_drops_the_mask(tmp_path):
    # tumour in the upper right of a 96 x 128 slice (rows 10-29, columns 60-79): far from where swapped axes would
    # put it (rows 60-79, columns 10-29)
    record = _slice_with_tumour(tmp_path, "s1", slice(10, 30), slice(60, 80))
    (kept,) = roi_records([record], "mask", _masks_csv(tmp_path, [record]))
    out = preprocessing_transforms(image_size=64, roi_fraction=0.5)(kept)
    assert "mask" not in out and tuple(out["image"].shape) == (3, 64, 64)
    image = out["image"][0]
    assert image[32, 32] > 0.9  # the tumour's centre is the crop's centre
    assert image[:4, :4].max() < 0.2 and image[-4:, -4:].max() < 0.2  # its corners are the dark background
    whole = preprocessing_transforms(image_size=64)({"image": record["image"]})["image"][0]
    assert whole[32, 32] < 0.2  # the whole slice, by contrast, is dark in its centre
    rotated = training_transforms(image_size=64, roi_fraction=0.5, rotate_degrees=10.0)(kept)
    assert tuple(rotated["image"].shape) == (3, 64, 64) and "mask" not in rotated


def test_only_slices_showing_the_tumour_are_kept_with_their_masks(tmp_path):
    big = _slice_with_tumour(tmp_path, "s1", slice(10, 30), slice(20, 40))
    small = _slice_with_tumour(tmp_path, "s2", slice(10, 13), slice(20, 23))  # 9 tumour pixels
    unlisted = {**_slice_with_tumour(tmp_path, "s3", slice(0, 1), slice(0, 1)), "sop_instance_uid": "9.9"}
    masks_csv = _masks_csv(tmp_path, [big, small])
    records = [big, small, unlisted]
    assert roi_records(records, "none") == records
    kept = roi_records(records, "mask", masks_csv)
    assert [r["sop_instance_uid"] for r in kept] == [big["sop_instance_uid"]]
    assert kept[0]["mask"] == str(tmp_path / "masks" / "s1.png")
    with pytest.raises(ValueError, match="no slice has at least 20 tumour pixels"):
        roi_records([small], "mask", masks_csv)
    with pytest.raises(FileNotFoundError, match="--roi mask needs lesion masks: give --masks_csv"):
        roi_records([small], "mask", tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="roi must be one of"):
        roi_records(records, "box")


def test_the_demo_trees_own_masks_are_found_beside_its_slices(tmp_path):
    from conftest import tiny_datalist
    from scripts.records import load_datalist

    records = load_datalist(tiny_datalist(tmp_path, n_patients_per_grade=1, seed=0))
    masks_csv = find_masks_csv(records)
    assert masks_csv == tmp_path / "masks" / "masks.csv"
    kept = roi_records(records, "mask")
    assert kept and all(Path(r["mask"]).is_file() for r in kept)


def test_a_model_trained_on_regions_is_refused_where_no_masks_exist():
    assert require_whole_slice_model({"roi": "none"}) == {"roi": "none"}
    with pytest.raises(ValueError, match="trained on tumour regions"):
        require_whole_slice_model({"roi": "mask"})


def test_train_yaml_crops_training_and_validation_slices_with_roi_mask():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"roi": "mask", "roi_fraction": 0.5})
    for chain_id in ("train#preprocessing", "validate#preprocessing"):
        names = [type(t).__name__ for t in parser.get_parsed_content(chain_id).transforms]
        assert {"CropForegroundd", "ResizeWithPadOrCropd", "DeleteItemsd"} <= set(names)
    assert parser.get_parsed_content("model_settings")["roi"] == "mask"
    inference = ConfigParser()
    inference.read_config(str(REPO_ROOT / "bundle" / "configs" / "inference.yaml"))
    assert "@whole_slice_check" in inference.get("inference")
