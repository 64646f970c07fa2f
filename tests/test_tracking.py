"""MONAI's ``--tracking mlflow`` on our ids (``train#trainer``, ``train#handlers``, ``validate#evaluator``...).

MONAI patches its default MLflow handlers into the ids every model-zoo bundle uses; this checks that ours
are those ids by training one tiny epoch with tracking on and reading the run back from MLflow's store.
Runs when MLflow is installed (``pip install -e ".[tracking]"``).
"""

from __future__ import annotations

import pytest
from conftest import bundle_run

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[tracking]'")


def test_tracking_mlflow_records_training_and_validation(tmp_path):
    from scripts.demo_data import generate_demo_dataset

    data = generate_demo_dataset(tmp_path / "data", n_patients_per_grade=3, slices_per_series=2, image_size=(48, 48))
    bundle_root = tmp_path / "bundle_root"
    bundle_run(
        "training", "bundle/configs/train.yaml",
        "--dataset_dir", data["dicom_dir"], "--grades_csv", data["grades_csv"],
        "--index_output", str(tmp_path / "datalist.json"),
        "--bundle_root", str(bundle_root),
        "--backbone", "resnet18", "--hidden_size", "16",
        "--image_size", "32", "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
        "--tracking", "mlflow",
    )  # fmt: skip

    store = bundle_root / "eval" / "mlruns.db"  # MONAI's default: <output_dir>/mlruns.db
    assert store.is_file(), f"no MLflow store at {store}"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert runs, "MLflow recorded no run"
    metrics = {key for run in runs for key in run.data.metrics}
    assert {"train_loss", "train_acc", "val_acc"} <= metrics, metrics
