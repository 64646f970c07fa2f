"""Folder-per-class PNG/JPG datasets: the indexer's records, label map, split and errors, the PIL loading
chain, and one training + evaluating + inference run through `python -m monai.bundle` on a generated
4-class dataset laid out like the public brain tumour MRI sets (Training/<class>, Testing/<class>)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_run
from monai.data import create_test_image_2d
from PIL import Image
from scripts.grades import resolve_label_map
from scripts.image_folder import (
    folder_label_map,
    image_inference_records,
    index_image_folder,
    write_image_datalist,
)
from scripts.splits import make_splits, split_by_patient
from scripts.transforms import preprocessing_transforms, training_transforms

CLASSES = ("pituitary", "glioma", "notumor", "meningioma")  # written unsorted: the label map must sort them
# Per class: (number of blobs, largest radius, smallest radius); the classes differ in what the images show.
SHAPES = {"glioma": (1, 14, 10), "meningioma": (3, 8, 5), "notumor": (0, 1, 1), "pituitary": (8, 4, 2)}
TRAIN_CONFIG = "bundle/configs/train.yaml"
EVALUATE = "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']"
SMALL = ["--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--backbone", "resnet18"]
SMALL += ["--hidden_size", "32"]


def _image(name: str, seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    n_objs, rad_max, rad_min = SHAPES[name]
    rng = np.random.RandomState(seed)
    if n_objs == 0:
        img = rng.uniform(0, 0.2, size=(height, width))
    else:
        img, _ = create_test_image_2d(
            height, width, num_objs=n_objs, rad_max=rad_max, rad_min=rad_min, noise_max=0.1, random_state=rng
        )
    return (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-6)).astype(np.uint8)


def write_dataset(root: Path, n_train: int = 7, n_test: int = 2, split_folders: bool = True) -> Path:
    """Grey PNGs, plus RGB JPGs for glioma (exported colour MR must load as one grey channel)."""
    seed = 0
    parts = {"Training": n_train, "Testing": n_test} if split_folders else {"": n_train}
    for part, n in parts.items():
        for name in CLASSES:
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                pixels = _image(name, seed)
                if name == "glioma":
                    Image.fromarray(pixels).convert("RGB").save(
                        folder / f"{part[:2] or 'im'}-{name}_{i:03d}.jpg", quality=95
                    )
                else:
                    Image.fromarray(pixels).save(folder / f"{part[:2] or 'im'}-{name}_{i:03d}.png")
    return root


@pytest.fixture
def flat_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "flat", n_train=4, split_folders=False)


# ---- indexer --------------------------------------------------------------------------------------------
def test_label_map_is_the_sorted_folder_names(flat_dataset):
    expected = {"glioma": 0, "meningioma": 1, "notumor": 2, "pituitary": 3}
    assert folder_label_map(flat_dataset) == expected
    assert resolve_label_map(flat_dataset, default={"II": 0}) == expected
    assert resolve_label_map(None, default={"II": 0, "III": 1}) == {"II": 0, "III": 1}


def test_records_have_the_datalist_format_and_one_pseudo_patient_per_image(flat_dataset):
    index = index_image_folder(flat_dataset)
    assert len(index.records) == 16 and not index.skipped and not index.predefined_split
    for record in index.records:
        assert {"image", "label", "grade", "patient_id"} <= set(record) and "split" not in record
        assert index.label_map[record["grade"]] == record["label"]
        assert Path(record["image"]).is_file()
    assert len({r["patient_id"] for r in index.records}) == 16
    assert index.records[0]["patient_id"] == "glioma/im-glioma_000"


def test_predefined_training_testing_split_is_kept(tmp_path):
    root = write_dataset(tmp_path / "tumours", n_train=7, n_test=2)
    records = index_image_folder(root).records
    assert {r["split"] for r in records} == {"train", "test"}
    splits = make_splits(records, val_fraction=0.15, test_fraction=0.3, seed=0)
    assert {Path(r["image"]).parent.parent.name for r in splits["test"]} == {"Testing"}
    assert len(splits["test"]) == 8  # the Testing folder, whatever test_fraction says
    assert len(splits["validation"]) == 4 and len(splits["train"]) == 24  # one validation image per class
    assert {r["label"] for r in splits["validation"]} == {0, 1, 2, 3}
    train_ids = {r["patient_id"] for r in splits["train"]}
    assert not train_ids & {r["patient_id"] for r in splits["validation"] + splits["test"]}
    pooled = index_image_folder(root, predefined_split=False).records
    assert len(pooled) == 36 and all("split" not in r for r in pooled)


def test_kfold_pools_the_predefined_split(tmp_path):
    records = index_image_folder(write_dataset(tmp_path / "tumours", n_train=2, n_test=1)).records
    folds = [make_splits(records, protocol="kfold", val_fraction=0.0, fold=k, n_folds=3) for k in range(3)]
    assert sorted(r["patient_id"] for f in folds for r in f["test"]) == sorted(r["patient_id"] for r in records)


def test_records_without_a_predefined_split_are_split_as_before(flat_dataset):
    records = index_image_folder(flat_dataset).records
    assert make_splits(records, seed=3) == split_by_patient(records, val_fraction=0.15, test_fraction=0.15, seed=3)


def test_given_label_map_skips_other_folders_and_checks_its_classes(flat_dataset):
    index = index_image_folder(flat_dataset, {"glioma": 0, "pituitary": 1})
    assert {r["grade"] for r in index.records} == {"glioma", "pituitary"}
    assert sum("not in label_map" in s["reason"] for s in index.skipped) == 2
    with pytest.raises(ValueError, match="astrocytoma"):
        index_image_folder(flat_dataset, {"glioma": 0, "astrocytoma": 1})
    with pytest.raises(ValueError, match="0..1"):
        index_image_folder(flat_dataset, {"glioma": 0, "pituitary": 2})


def test_one_unreadable_image_is_skipped_and_reported(flat_dataset, tmp_path, caplog):
    broken = flat_dataset / "notumor" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (flat_dataset / "notumor" / "notes.txt").write_text("scanner settings")
    with caplog.at_level("WARNING"):
        records = write_image_datalist(flat_dataset, tmp_path / "out" / "images.json")
    assert len(records) == 16 and str(broken) not in {r["image"] for r in records}
    assert "broken.png" in caplog.text and "unreadable image" in caplog.text
    skipped = {row["path"]: row["reason"] for row in csv.DictReader(open(tmp_path / "out" / "images_skipped.csv"))}
    assert skipped[str(broken)].startswith("unreadable image")
    assert "not an image file" in skipped[str(flat_dataset / "notumor" / "notes.txt")]
    assert json.loads((tmp_path / "out" / "images.json").read_text()) == records


def test_empty_or_all_unreadable_class_folder_is_an_error_naming_it(flat_dataset):
    (flat_dataset / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no readable image"):
        index_image_folder(flat_dataset)
    (flat_dataset / "empty" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"empty holds no readable image.*a\.jpg: unreadable image"):
        index_image_folder(flat_dataset)


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        index_image_folder(tmp_path / "nowhere")
    root = write_dataset(tmp_path / "mixed", n_train=1, n_test=1)
    (root / "Testing" / "lymphoma").mkdir()
    Image.fromarray(_image("glioma", 0)).save(root / "Testing" / "lymphoma" / "x.png")
    with pytest.raises(ValueError, match=r"\['lymphoma'\] of .*Testing"):
        index_image_folder(root)
    (root / "extra").mkdir()
    with pytest.raises(ValueError, match="mixes split folders"):
        index_image_folder(root)


def test_inference_records_list_every_readable_image(flat_dataset, tmp_path):
    (flat_dataset / "glioma" / "broken.jpg").write_bytes(b"garbage")
    records = image_inference_records(flat_dataset / "glioma", tmp_path)
    assert len(records) == 4 and all(r["series_uid"] == r["patient_id"] for r in records)
    assert "broken.jpg" in (tmp_path / "skipped.csv").read_text()
    assert len(image_inference_records(records[0]["image"], tmp_path)) == 1


# ---- loading ----------------------------------------------------------------------------------------------
def test_png_and_rgb_jpg_load_as_grey_in_the_dicom_axis_convention(tmp_path):
    pixels = _image("pituitary", 5)  # 40 rows x 48 columns
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "a.jpg", quality=100)
    for name in ("a.png", "a.jpg"):
        for reader in ("auto", "pil"):
            out = preprocessing_transforms(image_size=32, reader=reader)({"image": str(tmp_path / name)})["image"]
            assert tuple(out.shape) == (3, 32, 32) and out.dtype == torch.float32
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # no resize: the loaded array is (x=columns, y=rows) like DicomSliceReader's, i.e. the PIL array transposed
    loaded = preprocessing_transforms(image_size=1, reader="pil").transforms[0]({"image": str(tmp_path / "a.png")})
    np.testing.assert_array_equal(np.asarray(loaded["image"]), pixels.T)
    trained = training_transforms(image_size=32)({"image": str(tmp_path / "a.jpg")})["image"]
    assert tuple(trained.shape) == (3, 32, 32)
    with pytest.raises(ValueError, match="auto"):
        preprocessing_transforms(reader="nifti")


# ---- through the bundle ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tumour_folder(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("brain_tumour") / "dataset")


def test_bundle_trains_evaluates_and_infers_on_an_image_folder(tumour_folder, tmp_path):
    root = tmp_path / "bundle_root"
    data = ["--image_folder", str(tumour_folder), "--index_output", str(tmp_path / "images.json")]
    log = bundle_run("training", TRAIN_CONFIG, *data, *SMALL, "--epochs", "1", "--bundle_root", str(root))
    assert "Epoch[1] Complete" in log
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["branches.0.classifier.1.weight"].shape[0] == 4  # num_classes from the folder names
    assert (tmp_path / "images.json").is_file() and (tmp_path / "images_skipped.csv").is_file()

    bundle_run("evaluating", EVALUATE, *data, *SMALL, "--bundle_root", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["n_slices"] == metrics["n_patients"] == 8  # the Testing folder; one pseudo-patient per image
    ensemble = metrics["slice_level"]["ensemble"]
    assert list(ensemble["per_class"]) == ["glioma", "meningioma", "notumor", "pituitary"]
    assert np.asarray(ensemble["confusion_matrix"]).shape == (4, 4)
    rows = list(csv.DictReader(open(root / "eval" / "predictions.csv")))
    assert len(rows) == 8 and {r["true_grade"] for r in rows} == {"glioma", "meningioma", "notumor", "pituitary"}
    assert all("Testing" in r["image_path"] for r in rows)
    assert (root / "eval" / "confusion_matrix.png").stat().st_size > 1000

    out = tmp_path / "inference"
    bundle_run(
        "inference",
        "bundle/configs/inference.yaml",
        "--image_folder", str(tumour_folder),
        "--input", str(tumour_folder / "Testing" / "glioma"),
        "--output_dir", str(out),
        "--image_size", "64", "--backbone", "resnet18", "--hidden_size", "32",
        "--bundle_root", str(root),
    )  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["slices"]) == 2
    assert set(predictions["slices"][0]["probabilities"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    by_image = {r["image_path"]: r for r in rows}
    for inferred in predictions["slices"]:  # one chain: inference grades an image as evaluation did
        evaluated = by_image[str(Path(inferred["image"]).resolve())]
        for name, p in inferred["probabilities"].items():
            assert p == pytest.approx(float(evaluated[f"p_{name}"]), abs=1e-5)
