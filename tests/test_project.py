"""The project's own promises: the README's two commands, CI calling the test command, valid metadata."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, tiny_datalist


def _readme_shell_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)]


def test_readme_first_two_blocks_install_then_demo_and_tests():
    first, second = _readme_shell_blocks()[:2]
    assert "pip install -e ." in first and "monai.bundle run training" in first
    assert "monai.bundle run evaluating" in first
    assert 'pip install -e ".[test,deploy,tracking]"' in second and "pytest" in second
    for block in (first, second):
        assert "python3 -m venv" in block, "each command must work on its own in a fresh clone"


def test_ci_runs_the_readme_test_command_verbatim():
    second = _readme_shell_blocks()[1]
    test_command = second.splitlines()[-1].split("&& ", 2)[-1]  # after creating and activating the venv
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci, f"{test_command!r} not in .ci/run"


def test_metadata_is_valid_against_the_shipped_schema(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "bundle/configs/metadata.json",
            "--filepath",
            "schemas/monai_meta_schema_20240725.json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_declares_grades_as_output_channels():
    meta = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["type"] == "probabilities" and pred["num_channels"] == 3
    assert list(pred["channel_def"].values()) == ["grade II", "grade III", "grade IV"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["spatial_shape"] == [128, 128]
    assert meta["version"] in meta["changelog"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    datalist = tiny_datalist(tmp_path_factory.mktemp("workflow_data"), n_patients_per_grade=3, seed=0)
    return {"train": str(datalist), "infer": str(datalist.parent / "dicom")}


@pytest.mark.parametrize(
    "config, workflow_type, data_id", [("train.yaml", "train", "datalist"), ("inference.yaml", "infer", "dataset_dir")]
)
def test_monai_workflow_properties_are_all_present(config, workflow_type, data_id, tiny_data):
    """The model zoo's check: every property MONAI's ConfigWorkflow requires of a train/infer bundle has its id."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "bundle" / "configs" / config),
        meta_file=str(REPO_ROOT / "bundle" / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        **{data_id: tiny_data[workflow_type], "num_workers": 0, "val_fraction": 0.34, "test_fraction": 0.34},
    )
    workflow.initialize()
    assert workflow.check_properties() == []
