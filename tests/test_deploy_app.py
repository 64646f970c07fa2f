"""The MONAI Deploy app, run as users run it: ``python bundle/scripts/deploy_app.py -i STUDY -o OUT -m MODEL``.

A small synthetic study holds one T1-weighted sagittal series and two distractors (axial T1, sagittal T2) plus
a stray text file. A randomly initialised SDLNet (ResNet-18 branches, small hidden layer) is exported with
``ckpt_export`` and also laid out as a bundle folder; the app must grade only the T1 sagittal series, with
probabilities equal to the eager network's mean over the slices prepared by the bundle's own preprocessing,
and write a Basic Text SR that pydicom reads back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

pytest.importorskip(
    "monai.deploy", reason="MONAI Deploy App SDK not installed (the optional extra: pip install -e '.[deploy]')"
)

import pydicom  # noqa: E402
from pydicom.uid import BasicTextSRStorage  # noqa: E402
from scripts.model_settings import DEFAULTS, write_model_settings  # noqa: E402
from scripts.network import SDLNet  # noqa: E402
from scripts.synthetic_dicom import AXIAL, SAGITTAL, write_mr_slice  # noqa: E402
from scripts.transforms import preprocessing_transforms  # noqa: E402

APP = REPO_ROOT / "bundle" / "scripts" / "deploy_app.py"
CONFIGS = REPO_ROOT / "bundle" / "configs"
CLASS_NAMES = ["II", "III", "IV"]
DISPLAY = {"II": "grade II", "III": "grade III", "IV": "grade IV"}
# Small network: the bundle's inference config with these two values changed.
SMALL = {"backbone": "resnet18", "hidden_size": 16}  # the model's settings, as training writes them
STUDY_UID = "2.25.111111111111111111111111111111111"
T1_SAG_UID = STUDY_UID + ".3"
AX_T1_UID = STUDY_UID + ".2"
SAG_T2_UID = STUDY_UID + ".6"


def _slice(rng: np.random.Generator, shape: tuple[int, int], lesion: float) -> np.ndarray:
    """A head-like ellipse with noise and a lesion whose size varies, so slices give different probabilities."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    head = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 <= 1
    img = np.where(head, 800.0, 0.0) + rng.normal(0, 30, shape)
    img[(yy - 0.4 * h) ** 2 + (xx - 0.55 * w) ** 2 <= (lesion * h) ** 2] = 1600.0
    return np.clip(img, 0, 2000).astype(np.uint16)


def _write_study(root: Path) -> list[Path]:
    """Write the study; return the T1 sagittal files in instance order."""
    rng = np.random.default_rng(0)
    series = [  # (number, uid, description, orientation, TR, TE, slices)
        (2, AX_T1_UID, "AX T1", AXIAL, 550.0, 12.0, 2),
        (3, T1_SAG_UID, "SAG T1", SAGITTAL, 500.0, 15.0, 4),
        (6, SAG_T2_UID, "SAG T2", SAGITTAL, 4200.0, 102.0, 2),
    ]
    t1_files = []
    for number, uid, description, orientation, tr, te, n in series:
        for i in range(n):
            path = write_mr_slice(
                root / f"{number}-{description.replace(' ', '_')}" / f"1-{i + 1:02d}.dcm",
                _slice(rng, (64, 56), 0.05 + 0.04 * i),
                patient_id="DEPLOY-01",
                study_uid=STUDY_UID,
                series_uid=uid,
                series_number=number,
                instance_number=i + 1,
                series_description=description,
                orientation=orientation,
                position=(5.0 * i, -120.0, 120.0),
                repetition_time=tr,
                echo_time=te,
            )
            if uid == T1_SAG_UID:
                t1_files.append(path)
    (root / "README.txt").write_text("not a DICOM file\n")
    return t1_files


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict:
    """Study, eager reference probabilities, a bundle folder and its exported TorchScript archive."""
    from monai.bundle import ckpt_export

    root = tmp_path_factory.mktemp("deploy")
    t1_files = _write_study(root / "study")

    torch.manual_seed(0)
    net = SDLNet(  # Zhang's output init: a zero output layer would make the mirror change nothing
        backbone="resnet18", num_classes=3, hidden_size=16, pretrained=False, random_init="torchvision"
    ).eval()
    with torch.no_grad():  # random init gives near-uniform probabilities; spread them so the test can tell
        for branch in net.branches:
            branch.classifier[1].weight.mul_(40.0)

    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = (CONFIGS / "inference.yaml").read_text()
    write_model_settings(bundle / "models" / "model.pt", {**DEFAULTS, **SMALL})  # as training writes it
    export_config = root / "export" / "inference.yaml"  # the archive embeds this one: no TTA
    export_config.parent.mkdir()
    export_config.write_text(config)
    # The bundle-folder run also exercises the config's left-right flip TTA switch, when the config has one.
    tta = "\ntta_flip: false\n" in config
    (bundle / "configs" / "inference.yaml").write_text(config.replace("\ntta_flip: false\n", "\ntta_flip: true\n"))
    shutil.copy(CONFIGS / "metadata.json", bundle / "configs" / "metadata.json")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    # Both forms of MODEL, run exactly as the contract says; concurrently with the export and the reference,
    # since an app process spends most of its time importing.
    runs = [_start_app(root / "study", root / "out_bundle", bundle)]
    try:
        archive = root / "model.ts"
        ckpt_export(
            net_id="network_def",
            filepath=str(archive),
            ckpt_file=str(bundle / "models" / "model.pt"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            config_file=str(export_config),
            bundle_root=str(bundle),  # the settings are read from beside its models/model.pt
        )
        runs.append(_start_app(root / "study", root / "out_ts", archive))
        preprocessing = preprocessing_transforms(image_size=128)  # the bundle's chain, loading the files itself
        batch = torch.stack([preprocessing({"image": str(f)})["image"].as_tensor() for f in t1_files])
        with torch.no_grad():
            per_slice = net(batch).double().numpy()
            # run inference's TTA: the mean over the slice and its mirror along x (tensor dim 2), see scripts.tta
            per_slice_tta = ((net(batch) + net(torch.flip(batch, dims=(2,)))) / 2).double().numpy()
        assert np.abs(per_slice_tta - per_slice).max() > 1e-3, "the mirror changes nothing: TTA would go untested"
    finally:
        failures = [failure for failure in map(_finish, runs) if failure]
    if failures:
        pytest.fail("\n\n".join(failures))
    return {
        "root": root,
        "outputs": {"ts": root / "out_ts", "bundle": root / "out_bundle"},
        "per_slice": {"ts": per_slice, "bundle": per_slice_tta if tta else per_slice},
        "tta": tta,
    }


def _start_app(study: Path, out: Path, model: Path) -> tuple[list[str], subprocess.Popen]:
    command = [sys.executable, str(APP), "-i", str(study), "-o", str(out), "-m", str(model)]
    process = subprocess.Popen(command, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return command, process


def _finish(run: tuple[list[str], subprocess.Popen]) -> str:
    """Wait for one app run; return "" on success, else the command and the end of its log."""
    command, process = run
    try:
        log, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        log, _ = process.communicate()
    if process.returncode == 0:
        return ""
    return f"{' '.join(command)} exited with {process.returncode}:\n{log[-5000:]}"


def _check_grade_json(out: Path, per_slice: np.ndarray) -> dict:
    content = json.loads((out / "grade.json").read_text())
    assert content["class_names"] == CLASS_NAMES
    assert [s["SeriesInstanceUID"] for s in content["series"]] == [T1_SAG_UID]  # distractors not graded
    series = content["series"][0]
    expected = per_slice.mean(axis=0)
    assert series["n_slices"] == len(per_slice) == 4
    assert list(series["probabilities"]) == CLASS_NAMES
    probs = np.array([series["probabilities"][c] for c in CLASS_NAMES])
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert series["grade"] == CLASS_NAMES[int(expected.argmax())]
    assert series["grade_name"] == DISPLAY[series["grade"]]
    slices = np.array([[s["probabilities"][c] for c in CLASS_NAMES] for s in series["slices"]])
    np.testing.assert_allclose(slices, per_slice, atol=1e-5, rtol=0)
    assert expected.max() - expected.min() > 0.05, "probabilities too uniform for the comparison to mean much"

    (study,) = content["studies"]
    assert study["StudyInstanceUID"] == STUDY_UID
    assert study["instances_left_out"] == {"not_sagittal": 2, "not_t1_t2": 2}
    return series


def test_app_grades_the_t1_sagittal_series_from_the_exported_torchscript(deployment):
    out = deployment["outputs"]["ts"]
    series = _check_grade_json(out, deployment["per_slice"]["ts"])

    (sr_file,) = out.glob("*.dcm")
    sr = pydicom.dcmread(sr_file)
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == BasicTextSRStorage
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.PatientID == "DEPLOY-01"
    assert sr.SeriesInstanceUID not in (T1_SAG_UID, AX_T1_UID, SAG_T2_UID)  # a new series in the same study
    text = sr.ContentSequence[0].TextValue
    assert f"{series['grade_name']}." in text and T1_SAG_UID in text
    assert AX_T1_UID not in text and SAG_T2_UID not in text


def test_app_takes_the_bundle_folder_as_model(deployment):
    out = deployment["outputs"]["bundle"]
    content = json.loads((out / "grade.json").read_text())
    assert content["model"]["form"] == "bundle"
    assert content["model"]["tta_flip"] == deployment["tta"]
    _check_grade_json(out, deployment["per_slice"]["bundle"])
    assert len(list(out.glob("*.dcm"))) == 1
