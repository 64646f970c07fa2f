"""End to end through `python -m monai.bundle`, exactly as users run it, on a tiny generated DICOM tree.

One module-scoped training run (2 epochs, 64x64 images) feeds the evaluating, inference and consistency
tests; resume gets its own short run. The runs happen in subprocesses from the repository root, so the
config wiring, `scripts` imports and command-line overrides are tested the way the README uses them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, bundle_run

TRAIN = "bundle/configs/train.yaml"
EVALUATE = "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']"
INFERENCE = "bundle/configs/inference.yaml"
SMALL = ["--image_size", "64", "--batch_size", "4", "--num_workers", "0"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> dict:
    from scripts.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    return generate_demo_dataset(root, n_patients_per_grade=4, slices_per_series=3, image_size=(72, 64), seed=1)


@pytest.fixture(scope="module")
def data_args(tiny_dataset, tmp_path_factory) -> list[str]:
    datalist = tmp_path_factory.mktemp("index") / "datalist.json"
    bundle_run(
        "indexing",
        TRAIN,
        "--dataset_dir", tiny_dataset["dicom_dir"],
        "--grades_csv", tiny_dataset["grades_csv"],
        "--patient_column", "Sample",
        "--grade_column", "Grade",
        "--datalist", str(datalist),
    )  # fmt: skip
    return ["--datalist", str(datalist)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_args) -> Path:
    bundle_root = tmp_path_factory.mktemp("bundle_root")
    log = bundle_run("training", TRAIN, *data_args, *SMALL, "--epochs", "2", "--bundle_root", str(bundle_root))
    assert "Epoch[2] Complete" in log
    return bundle_root


def test_indexing_writes_datalist_and_report(data_args):
    datalist = Path(data_args[1])
    records = json.loads(datalist.read_text())
    assert {r["grade"] for r in records} == {"II", "III", "IV"}
    assert all({"image", "label", "grade", "patient_id"} <= set(r) for r in records)
    assert Path(str(datalist).replace(".json", "_report.md")).is_file()


def test_training_writes_best_and_last_checkpoints(trained):
    best = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values()), "model.pt is a bare state_dict"
    assert "branches.0.classifier.1.weight" in best
    last = list((trained / "models").glob("checkpoint*epoch=2.pt"))
    assert len(last) == 1
    resumable = torch.load(last[0], map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(resumable)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (trained / "logs").glob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    expected = {"ce_a", "ce_b", "synergic_bce", "synergic_acc", "learning_rate", "val_acc", "train_acc_branch1"}
    assert expected <= tags, f"TensorBoard lacks {expected - tags}"


def test_plain_run_id_is_training():
    """MONAI Label and other callers run the bundle's `run` key."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / TRAIN))
    parser.resolve_macro_and_relative_ids()
    assert parser.get("run") == parser.get("training")
    assert "@train::run" in parser.get("run")  # MONAI normalises "#" to "::"
    assert parser.get("train#run")["_target_"] == "scripts.checkpoints.run_training"


def test_evaluating_writes_metrics_tables_and_plot(trained, data_args):
    bundle_run("evaluating", EVALUATE, *data_args, *SMALL, "--bundle_root", str(trained))
    out = trained / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test"
    slice_level = metrics["slice_level"]
    assert {"ensemble", "branch1", "branch2"} <= set(slice_level)
    for key in ("accuracy", "macro", "per_class", "confusion_matrix"):
        assert key in slice_level["ensemble"]
    assert set(slice_level["ensemble"]["macro"]) == {"precision", "recall", "specificity", "f1", "auc"}
    assert metrics["patient_level"]["ensemble"]["n"] == metrics["n_patients"] >= 3
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == metrics["n_slices"]
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("II", "III", "IV")) - 1) < 1e-4
    assert (out / "patients.csv").is_file() and (out / "confusion_matrix.png").stat().st_size > 1000


def test_inference_on_one_file_matches_the_evaluating_path(trained, data_args, tmp_path):
    """One preprocessing chain: a slice graded by `run evaluating` and by `run inference` gets the same
    probabilities."""
    bundle_run("evaluating", EVALUATE, *data_args, *SMALL, "--bundle_root", str(trained))
    evaluated = next(csv.DictReader(open(trained / "eval" / "predictions.csv")))
    out = tmp_path / "inference"
    bundle_run(
        "inference",
        INFERENCE,
        "--input", evaluated["image_path"],
        "--output_dir", str(out),
        "--image_size", "64",
        "--bundle_root", str(trained),
    )  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["slices"]) == 1 and len(predictions["series"]) == 1
    inferred = predictions["slices"][0]
    assert inferred["image"] == evaluated["image_path"]
    assert inferred["grade"] == evaluated["predicted_grade"]
    for grade in ("II", "III", "IV"):
        assert inferred["probabilities"][grade] == pytest.approx(float(evaluated[f"p_{grade}"]), abs=1e-5)


def test_inference_on_a_tree_grades_every_selected_slice_and_series(trained, tiny_dataset, data_args, tmp_path):
    out = tmp_path / "tree"
    bundle_run(
        "inference",
        INFERENCE,
        "--input", tiny_dataset["dicom_dir"],
        "--output_dir", str(out),
        "--image_size", "64",
        "--bundle_root", str(trained),
    )  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    datalist = json.loads(Path(data_args[1]).read_text())
    # every graded slice of the datalist, plus the slices of the patient without a grade
    assert len(predictions["slices"]) >= len(datalist)
    assert len(predictions["series"]) == len({s["series_uid"] for s in predictions["slices"]})
    skipped = (out / "skipped.csv").read_text()
    assert "localizer" in skipped and "not_sagittal" in skipped


def _colour_copy(source: str, target: Path) -> Path:
    """A copy of a slice stored as RGB: it passes the indexer (headers only) but the reader refuses it."""
    import pydicom

    ds = pydicom.dcmread(source)
    grey = ds.pixel_array.astype("uint8")
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = grey.repeat(3).tobytes()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def test_a_slice_that_cannot_be_loaded_is_skipped_listed_and_training_goes_on(tmp_path, data_args):
    records = json.loads(Path(data_args[1]).read_text())
    colour = _colour_copy(records[0]["image"], tmp_path / "colour.dcm")
    gone = tmp_path / "deleted_since_indexing.dcm"
    records[0] = {**records[0], "image": str(colour)}
    records[1] = {**records[1], "image": str(gone)}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(records))
    log = bundle_run(
        "training", TRAIN, "--datalist", str(datalist), *SMALL, "--epochs", "1", "--bundle_root", str(tmp_path)
    )
    assert "Epoch[1] Complete" in log and (tmp_path / "models" / "model.pt").is_file()
    assert f"skipped {colour}" in log
    rows = {row["path"]: row for row in csv.DictReader(open(tmp_path / "eval" / "skipped_loading.csv"))}
    assert set(rows) == {str(colour), str(gone)}
    assert {row["reason"] for row in rows.values()} == {"load_failed"}
    assert "PhotometricInterpretation 'RGB'" in rows[str(colour)]["detail"]
    assert "FileNotFoundError" in rows[str(gone)]["detail"] or "No such file" in rows[str(gone)]["detail"]


def test_inference_grades_the_good_slices_of_a_series_and_lists_the_others(trained, data_args, tmp_path):
    """A series holding a multi-frame MR and a slice the reader cannot decode beside good slices."""
    import pydicom

    records = json.loads(Path(data_args[1]).read_text())
    series = [r for r in records if r["series_uid"] == records[0]["series_uid"]]
    folder = tmp_path / "series"
    folder.mkdir()
    for i, record in enumerate(series):
        (folder / f"{i}.dcm").write_bytes(Path(record["image"]).read_bytes())
    enhanced = pydicom.dcmread(series[0]["image"])
    enhanced.NumberOfFrames, enhanced.PixelData = 2, enhanced.PixelData * 2
    enhanced.SOPInstanceUID = pydicom.uid.generate_uid()
    enhanced.save_as(folder / "multi_frame.dcm")
    _colour_copy(series[0]["image"], folder / "colour.dcm")
    out = tmp_path / "out"
    bundle_run("inference", INFERENCE, "--input", str(folder), "--output_dir", str(out), "--bundle_root", str(trained))
    graded = {Path(s["image"]).name for s in json.loads((out / "predictions.json").read_text())["slices"]}
    assert graded == {f"{i}.dcm" for i in range(len(series))}
    reasons = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(open(out / "skipped.csv"))}
    assert reasons == {"multi_frame.dcm": "multi_frame", "colour.dcm": "load_failed"}


def test_resume_continues_at_the_next_epoch(tmp_path, data_args):
    root = str(tmp_path)
    small = [*data_args, *SMALL, "--bundle_root", root, "--backbone", "resnet18"]
    bundle_run("training", TRAIN, *small, "--epochs", "1")
    log = bundle_run("training", TRAIN, *small, "--epochs", "2", "--resume", "true")
    assert "resuming from" in log
    assert "Epoch[1] Complete" not in log, "the resumed run must not repeat epoch 1"
    assert "Epoch[2] Complete" in log
    assert list(Path(root, "models").glob("checkpoint*epoch=2.pt"))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_args):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, *data_args]
    command += [*SMALL, "--bundle_root", str(tmp_path), "--resume", "true"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "no checkpoint" in result.stdout + result.stderr


def test_three_branches_train_and_evaluate(tmp_path, data_args):
    """SDL^3: N-tuples from the group sampler, three synergic heads, graded by the mean of three branches."""
    args = [*data_args, *SMALL, "--num_branches", "3", "--hidden_size", "64", "--bundle_root", str(tmp_path)]
    log = bundle_run("training", TRAIN, *args, "--epochs", "1")
    assert "Epoch[1] Complete" in log
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert {k.split(".")[1] for k in state if k.startswith("branches.")} == {"0", "1", "2"}
    assert {k.split(".")[1] for k in state if k.startswith("heads.")} == {"0", "1", "2"}
    bundle_run("evaluating", EVALUATE, *args)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ensemble", "branch1", "branch2", "branch3"} <= set(metrics["slice_level"])
