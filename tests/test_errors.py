"""Expected errors end a run in a line or two without a traceback; unexpected ones keep theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from scripts.errors import LOG_FILE, expected_error
from scripts.splits import make_splits
from scripts.synthetic_dicom import AXIAL, write_mr_slice

TRAIN = "bundle/configs/train.yaml"
INFERENCE = "bundle/configs/inference.yaml"


def _caught(function) -> BaseException:
    try:
        function()
    except BaseException as error:  # noqa: BLE001 - the test inspects whatever was raised
        return error
    raise AssertionError("nothing was raised")


def _wrapped_as_monai_does(error: BaseException) -> BaseException:
    try:
        raise RuntimeError("Failed to instantiate component 'splits'") from error
    except RuntimeError as wrapper:
        return wrapper


def test_only_errors_the_bundle_raises_about_its_input_are_expected():
    ours = _caught(lambda: make_splits([{"patient_id": "P", "label": 0}], protocol="no-such-protocol"))
    assert isinstance(ours, ValueError)
    assert expected_error(_wrapped_as_monai_does(ours)) is ours
    # a ValueError raised elsewhere (here: this test) is not the bundle's message about its input
    assert expected_error(_wrapped_as_monai_does(_caught(lambda: int("x")))) is None
    # neither is another kind of error raised by the bundle's code (a bug)
    assert expected_error(_caught(lambda: make_splits(None))) is None


@pytest.fixture(scope="module")
def axial_only(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("axial_only")
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_mr_slice(
        root / "1-01.dcm", pixels, patient_id="AX-1", study_uid="2.25.1", series_uid="2.25.2", orientation=AXIAL
    )
    return root


def _bundle_fails(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SDL_GLIOMA_TRACEBACK"}
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"full traceback in {LOG_FILE}" in result.stderr
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


@pytest.fixture
def bundle_with_model(tmp_path) -> Path:
    """A bundle root whose models/model.pt exists: the input is checked before the weights are loaded."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    return tmp_path


def test_the_debug_switch(monkeypatch):
    from scripts.errors import debug_requested

    monkeypatch.delenv("SDL_GLIOMA_TRACEBACK", raising=False)
    assert not debug_requested(["run", "training", "--epochs", "2"])
    assert not debug_requested(["run", "training", "--debug", "false"])
    assert debug_requested(["run", "training", "--debug", "true", "--epochs", "2"])
    assert debug_requested(["run", "training", "--debug=True"])
    monkeypatch.setenv("SDL_GLIOMA_TRACEBACK", "1")
    assert debug_requested(["run", "training"])


def test_a_tree_without_t1_sagittal_slices(axial_only, bundle_with_model):
    tmp_path = bundle_with_model
    line = _bundle_fails(
        "inference", "--config_file", INFERENCE, "--input", str(axial_only), "--bundle_root", str(tmp_path)
    )
    assert "no T1-weighted sagittal MR slice found in" in line and str(axial_only) in line


def test_a_missing_grades_csv(axial_only, tmp_path):
    missing = tmp_path / "grades.csv"
    line = _bundle_fails(
        "training", "--config_file", TRAIN, "--dataset_dir", str(axial_only), "--grades_csv", str(missing)
    )
    assert str(missing) in line and "not found" in line


def test_a_missing_input_path(bundle_with_model):
    missing = bundle_with_model / "nowhere"
    line = _bundle_fails(
        "inference", "--config_file", INFERENCE, "--input", str(missing), "--bundle_root", str(bundle_with_model)
    )
    assert str(missing) in line and "not found" in line


def test_a_missing_model(axial_only, tmp_path):
    line = _bundle_fails(
        "inference", "--config_file", INFERENCE, "--input", str(axial_only), "--bundle_root", str(tmp_path)
    )
    assert str(tmp_path / "models" / "model.pt") in line and "run training" in line


def test_a_missing_datalist(tmp_path):
    missing = tmp_path / "datalist.json"
    line = _bundle_fails("training", "--config_file", TRAIN, "--datalist", str(missing))
    assert str(missing) in line and "does not exist" in line


def test_debug_true_prints_the_traceback_of_an_expected_error(tmp_path):
    missing = tmp_path / "datalist.json"
    env = {k: v for k, v in os.environ.items() if k != "SDL_GLIOMA_TRACEBACK"}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    command += ["--datalist", str(missing), "--debug", "true"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and str(missing) in result.stderr
