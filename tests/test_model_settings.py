"""The settings that define a model travel with it: model_settings.json beside model.pt, read by evaluation,
inference, export and the Deploy app; conflicting overrides and resumed runs with other settings are errors."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, bundle_run, monai_bundle, tiny_datalist
from scripts.model_settings import (
    DEFAULTS,
    SETTINGS_FILE,
    SettingsConflict,
    check_settings,
    prepare_training_outputs,
    read_model_settings,
    require_model,
    write_model_settings,
)

TRAIN = "bundle/configs/train.yaml"
EVALUATE = "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']"
INFERENCE = "bundle/configs/inference.yaml"
TRAINED_WITH = ["--backbone", "resnet18", "--image_size", "64", "--gaussian_kernel", "3"]


def _failing(*args: str) -> str:
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, "the run should have failed"
    return result.stdout + result.stderr


def test_defaults_are_the_values_train_yaml_ships():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / TRAIN))
    assert check_settings({"_source": None}, parser.get_parsed_content("model_settings")) == DEFAULTS


def test_training_outputs_are_checked_before_epoch_1(tmp_path):
    models = prepare_training_outputs(tmp_path / "models", DEFAULTS)
    assert models.is_dir() and not any(models.iterdir()), "checking writes nothing"
    path = write_model_settings(models / "model.pt", {**DEFAULTS, "image_size": 64})
    written = json.loads(path.read_text())
    assert path.name == SETTINGS_FILE and written["image_size"] == 64 and written["class_names"] == ["II", "III", "IV"]
    (models / "model.pt").write_bytes(b"weights")
    # a model is there: a new run needs --overwrite true, a resumed one the same settings (text from the command line)
    with pytest.raises(
        FileExistsError, match=r"model.pt already holds a trained model.*--resume true.*--overwrite true"
    ):
        prepare_training_outputs(models, DEFAULTS)
    prepare_training_outputs(models, DEFAULTS, overwrite="true")
    prepare_training_outputs(models, {**DEFAULTS, "image_size": "64", "pretrained": "false"}, resume=True)
    with pytest.raises(SettingsConflict, match=r"backbone: 'resnet18' here, 'alexnet' in training.*image_size: 128"):
        prepare_training_outputs(models, {**DEFAULTS, "backbone": "resnet18"}, resume="true")
    assert (models / "model.pt").read_bytes() == b"weights" and read_model_settings(models / "model.pt")[
        "image_size"
    ] == 64
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        prepare_training_outputs(tmp_path / "a_file", DEFAULTS)


def test_a_model_without_settings_uses_the_defaults_and_says_so(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no trained model at .*model.pt: train one first"):
        require_model(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="scripts.model_settings"):
        settings = read_model_settings(tmp_path / "model.pt")
    assert settings == {**DEFAULTS, "_source": None}
    assert f"{SETTINGS_FILE} not found" in caplog.text
    # nothing to check against: values given on the command line are taken as they are
    assert check_settings(settings, {**DEFAULTS, "image_size": "96"})["image_size"] == 96


def test_conflicting_override_names_both_values(tmp_path):
    write_model_settings(tmp_path / "model.pt", {**DEFAULTS, "gaussian_kernel": 3})
    (tmp_path / "model.pt").write_bytes(b"")
    trained = read_model_settings(tmp_path / "model.pt")
    assert check_settings(trained, {**DEFAULTS, "gaussian_kernel": "3"})["gaussian_kernel"] == 3
    with pytest.raises(SettingsConflict, match=r"gaussian_kernel: None here, 3 in training"):
        check_settings(trained, DEFAULTS)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> tuple[Path, list[str]]:
    """A resnet18 model at 64 px with 3x3 smoothing, trained for one epoch on a tiny tree."""
    datalist = tiny_datalist(tmp_path_factory.mktemp("settings_data"), n_patients_per_grade=3, seed=2)
    root = tmp_path_factory.mktemp("settings_bundle")
    data = ["--datalist", str(datalist), "--bundle_root", str(root)]
    bundle_run("training", TRAIN, *data, *TRAINED_WITH, "--epochs", "1", "--batch_size", "4", "--num_workers", "0")
    return root, data


def _probabilities(predictions_csv: Path) -> dict[str, list[float]]:
    return {
        r["image_path"]: [float(r[f"p_{g}"]) for g in ("II", "III", "IV")]
        for r in csv.DictReader(open(predictions_csv))
    }


def test_evaluation_inference_export_and_deploy_read_the_trained_settings(trained_model, tmp_path):
    root, data = trained_model
    written = json.loads((root / "models" / SETTINGS_FILE).read_text())
    assert (written["backbone"], written["image_size"], written["gaussian_kernel"]) == ("resnet18", 64, 3)

    bundle_run("evaluating", EVALUATE, *data, "--output_dir", str(tmp_path / "plain"))
    bundle_run("evaluating", EVALUATE, *data, *TRAINED_WITH, "--output_dir", str(tmp_path / "given"))
    plain, given = (
        _probabilities(tmp_path / "plain" / "predictions.csv"),
        _probabilities(tmp_path / "given" / "predictions.csv"),
    )
    assert plain.keys() == given.keys() and plain
    for image, probabilities in plain.items():
        assert probabilities == pytest.approx(given[image], abs=1e-5)

    image = next(iter(plain))
    bundle_run(
        "inference", INFERENCE, "--input", image, "--output_dir", str(tmp_path / "inferred"), "--bundle_root", str(root)
    )
    inferred = json.loads((tmp_path / "inferred" / "predictions.json").read_text())["slices"][0]["probabilities"]
    assert [inferred[g] for g in ("II", "III", "IV")] == pytest.approx(plain[image], abs=1e-5)

    archive = tmp_path / "model.ts"
    monai_bundle(
        "ckpt_export", "network_def",
        "--filepath", str(archive),
        "--ckpt_file", str(root / "models" / "model.pt"),
        "--meta_file", "bundle/configs/metadata.json",
        "--config_file", INFERENCE,
        "--bundle_root", str(root),
    )  # fmt: skip
    assert json.loads(torch.jit.load(str(archive)).model_settings)["image_size"] == 64

    from monai.transforms import LoadImage
    from scripts.deploy_operators import load_grading_model
    from scripts.dicom_reader import DicomSliceReader

    pixels = LoadImage(reader=DicomSliceReader(), image_only=True)(image)
    shutil.copytree(REPO_ROOT / "bundle" / "configs", root / "configs")  # the bundle folder the Deploy app reads
    for model_path in (archive, root):  # the exported archive, and the bundle folder
        model = load_grading_model(model_path, torch.device("cpu"))
        x = model.preprocessing({"image": pixels})["image"]
        assert tuple(x.shape) == (3, 64, 64)
        with torch.no_grad():
            probabilities = model.network(torch.as_tensor(x)[None]).squeeze(0).tolist()
        assert probabilities == pytest.approx(plain[image], abs=1e-5)


def test_an_override_that_contradicts_the_model_is_a_clear_error(trained_model):
    root, data = trained_model
    log = _failing("run", "evaluating", "--config_file", EVALUATE, *data, "--image_size", "128")
    assert "image_size: 128 here, 64 in training" in log
    weights = (root / "models" / "model.pt").read_bytes()
    log = _failing("run", "training", "--config_file", TRAIN, *data, "--epochs", "1")
    assert "model.pt already holds a trained model" in log
    assert (root / "models" / "model.pt").read_bytes() == weights, "the refused run changed the model"
    log = _failing("run", "training", "--config_file", TRAIN, *data, "--image_size", "32", "--resume", "true")
    assert "backbone: 'alexnet' here, 'resnet18' in training" in log and "image_size: 32 here, 64 in training" in log
