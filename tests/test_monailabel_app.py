"""MONAI Label app (monailabel_app/): datastore -> bundle records, train overrides, inference answer.

The plain logic (``monailabel_app.lib.grading``, the demo studies writer, the pydicom 3 compatibility hook) is
tested everywhere. The task classes need ``monailabel``, which CI does not install (MONAI Label 0.8.5 pins
numpy<2 and would downgrade the test environment); those tests run in the label environment of
bundle/docs/monailabel.md and are skipped elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.grades import read_grades
from scripts.synthetic_dicom import write_mr_slice

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monailabel_app.lib.grading import (  # noqa: E402  (needs the repository root on sys.path)
    MODEL_NAME,
    build_records,
    datastore_items,
    format_prediction,
    infer_request_problem,
    parse_grade_text,
    resolve_bundle_path,
    select_models,
    training_overrides,
)
from monailabel_app.make_demo_studies import make_demo_studies  # noqa: E402

HAVE_MONAILABEL = importlib.util.find_spec("monailabel") is not None
NO_MONAILABEL = (
    "monailabel is not installed: the label extra lives in its own environment (it pins numpy<2), "
    "see bundle/docs/monailabel.md"
)


def _slice(path: Path, patient_id: str) -> str:
    pixels = (np.random.default_rng(len(patient_id)).random((32, 32)) * 1000).astype(np.uint16)
    write_mr_slice(path, pixels, patient_id=patient_id, study_uid="1.2.3", series_uid=f"1.2.3.{len(patient_id)}")
    return str(path)


class FakeDatastore:
    """The read side of MONAI Label's LocalDatastore: images, image info, one label file per image and tag."""

    def __init__(self, images: dict[str, str], labels: dict[str, str] | None = None, info: dict | None = None):
        self.images, self.labels, self.info = images, labels or {}, info or {}

    def list_images(self) -> list[str]:
        return list(self.images)

    def get_image_uri(self, image_id: str) -> str:
        return self.images[image_id]

    def get_image_info(self, image_id: str) -> dict:
        return dict(self.info.get(image_id, {}), path=self.images[image_id])

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if tag == "final" and image_id in self.labels else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self.labels[label_id]

    def get_label_info(self, label_id: str, label_tag: str) -> dict:
        return {"name": Path(self.labels[label_id]).name}


@pytest.fixture
def datastore(tmp_path) -> FakeDatastore:
    """Six slices, one per way a grade can be given or be missing."""
    images = {name: _slice(tmp_path / f"{name}.dcm", pid) for name, pid in [
        ("a", "P1"), ("b", "P2"), ("c", "P3"), ("d", "P4"), ("e", "P5"), ("f", "P6"),
    ]}  # fmt: skip
    labels_dir = tmp_path / "labels" / "final"
    labels_dir.mkdir(parents=True)
    (labels_dir / "a.txt").write_text("Grade 2\n")
    (labels_dir / "d.txt").write_text("  \n")
    (labels_dir / "e.json").write_text(json.dumps({"grade": "grade 7"}))
    labels = {"a": str(labels_dir / "a.txt"), "d": str(labels_dir / "d.txt"), "e": str(labels_dir / "e.json")}
    info = {"c": {"grade": "III", "patient_id": "P3-override"}}
    (tmp_path / "grades.csv").write_text("Sample,Grade\nP2,GBM\nP1,IV\n")
    return FakeDatastore(images, labels, info)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("IV", "IV"),
        ("Grade 3\nannotator: x\n", "Grade 3"),
        ('{"grade": "GBM"}', "GBM"),
        ('{"label": "II", "other": 1}', "II"),
        ('"III"', "III"),
        ("4", "4"),
        ('{"comment": "unsure"}', ""),
        ("   ", ""),
        ("[1, 2]", ""),
    ],
)
def test_parse_grade_text(text, expected):
    assert parse_grade_text(text) == expected


def test_build_records_from_datastore(datastore, tmp_path):
    grades = read_grades(tmp_path / "grades.csv")
    records, skipped = build_records(datastore_items(datastore), grades=grades)
    by_id = {r["image_id"]: r for r in records}
    # a: the label file wins over the CSV (which says IV for P1); "Grade 2" is WHO grade II, not class index 2.
    assert by_id["a"]["grade"] == "II" and by_id["a"]["label"] == 0 and by_id["a"]["grade_source"] == "label file"
    assert by_id["a"]["patient_id"] == "P1"  # from the DICOM header
    assert by_id["b"]["grade"] == "IV" and by_id["b"]["label"] == 2 and by_id["b"]["grade_source"] == "grades csv"
    assert by_id["c"]["grade"] == "III" and by_id["c"]["patient_id"] == "P3-override"
    assert by_id["c"]["grade_source"] == "image info"
    assert set(by_id) == {"a", "b", "c"}
    reasons = {s["image_id"]: s["reason"] for s in skipped}
    assert "holds no grade" in reasons["d"]
    assert "unrecognised grade" in reasons["e"] and "label file" in reasons["e"]
    assert "not in the grades CSV" in reasons["f"]
    for record in records:
        assert record["image"] == record["image_path"] and Path(record["image"]).is_file()


def test_build_records_without_grades_csv(datastore):
    records, skipped = build_records(datastore_items(datastore))
    assert {r["image_id"] for r in records} == {"a", "c"}
    assert "no grades CSV" in {s["image_id"]: s["reason"] for s in skipped}["b"]


def test_build_records_custom_label_map(datastore):
    records, _ = build_records(datastore_items(datastore), label_map={"LGG": 0, "HGG": 1}, grade_aliases={"II": "LGG"})
    assert [(r["image_id"], r["grade"], r["label"]) for r in records] == [("a", "LGG", 0)]


def test_patient_id_falls_back_to_image_id(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not dicom")
    (tmp_path / "x.txt").write_text("IV")
    store = FakeDatastore({"x": str(tmp_path / "x.png")}, {"x": str(tmp_path / "x.txt")})
    records, _ = build_records(datastore_items(store))
    assert records[0]["patient_id"] == "x"


def test_training_overrides_reach_the_bundle_records(datastore, tmp_path):
    """What BundleTrainTask sets, rewritten by training_overrides, parsed by the bundle's own train.yaml."""
    records, _ = build_records(datastore_items(datastore), grades=read_grades(tmp_path / "grades.csv"))
    more = [
        {**r, "patient_id": f"{r['patient_id']}-{k}", "image_id": f"{r['image_id']}{k}"}
        for k in range(3)
        for r in records
    ]  # three patients per grade, so each grade has one validation patient
    overrides = {
        "bundle_root": str(BUNDLE),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": [{"image": "x", "label": "y"}],
        "validate#dataset#data": [],
        "device": "cpu",
        "train#handlers": [],
    }
    training_overrides(overrides, more, val_split=0.34, request={"batch_size": 2, "num_workers": 0, "foo": 1})
    assert "train#dataset#data" not in overrides and "validate#dataset#data" not in overrides
    assert overrides["test_fraction"] == 0.0 and overrides["val_fraction"] == 0.34
    assert overrides["batch_size"] == 2 and overrides["num_workers"] == 0 and "foo" not in overrides

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({k: v for k, v in overrides.items() if k != "train#handlers"})
    splits = parser.get_parsed_content("splits")
    assert splits["test"] == []
    assert len(splits["train"]) + len(splits["validation"]) == len(more)
    val_patients = {r["patient_id"] for r in splits["validation"]}
    assert len(val_patients) == 3 and not val_patients & {r["patient_id"] for r in splits["train"]}
    assert "data" not in parser.get("train#dataset")  # the pair dataset is built from records only
    assert parser.get_parsed_content("batch_size") == 2


def test_training_overrides_val_split():
    kept = training_overrides({}, [], val_split=-1)
    assert "val_fraction" not in kept  # MONAI Label's -1: the bundle's own default
    with pytest.raises(ValueError, match="validation patients"):
        training_overrides({}, [], val_split=0.0)


def test_format_prediction():
    out = format_prediction(torch.tensor([[0.1, 0.2, 0.7]]), ["II", "III", "IV"])
    assert out["grade"] == "IV" and out["label"] == 2
    assert out["probabilities"] == pytest.approx({"II": 0.1, "III": 0.2, "IV": 0.7})
    assert [p["label"] for p in out["prediction"]] == ["II", "III", "IV"]
    assert out["prediction"][2] == {"idx": 2, "label": "IV", "score": pytest.approx(0.7)}
    json.dumps(out)  # plain Python types only
    with pytest.raises(ValueError, match="2 scores for 3 classes"):
        format_prediction([0.5, 0.5], ["II", "III", "IV"])


def test_resolve_bundle_path_and_models(tmp_path):
    assert resolve_bundle_path(None, REPO_ROOT / "monailabel_app") == BUNDLE
    assert resolve_bundle_path(str(BUNDLE), "/elsewhere") == BUNDLE
    with pytest.raises(FileNotFoundError, match="missing configs/inference.yaml"):
        resolve_bundle_path(str(tmp_path), "/elsewhere")
    assert select_models(None) == [MODEL_NAME] == select_models("all") == select_models(f" {MODEL_NAME} ")
    with pytest.raises(ValueError, match="unknown model"):
        select_models("segmentation_spleen")


def test_infer_requests_the_app_cannot_answer_get_a_4xx_naming_the_cause(datastore, tmp_path):
    ok = {"model": MODEL_NAME, "image": "a"}
    assert infer_request_problem(ok, [MODEL_NAME], datastore) is None
    assert infer_request_problem({**ok, "image": datastore.images["b"]}, [MODEL_NAME], datastore) is None
    assert infer_request_problem({**ok, "model_filename": "model.pt"}, [MODEL_NAME], datastore) is None
    status, message = infer_request_problem({**ok, "image": "no-such-id"}, [MODEL_NAME], datastore)
    assert status == 404 and "'no-such-id'" in message
    status, message = infer_request_problem({**ok, "model": "segmentation"}, [MODEL_NAME], datastore)
    assert status == 404 and "'segmentation'" in message and MODEL_NAME in message
    status, message = infer_request_problem({**ok, "model_filename": "checkpoint_epoch=3.pt"}, [MODEL_NAME], datastore)
    assert status == 400 and "checkpoint_epoch=3.pt" in message
    assert infer_request_problem({**ok, "image": ""}, [MODEL_NAME], datastore)[0] == 400


def test_make_demo_studies(tmp_path):
    summary = make_demo_studies(tmp_path, patients_per_grade=1, slices_per_patient=1, image_size=(48, 48))
    files = sorted(p.name for p in tmp_path.glob("*.dcm"))
    assert files == ["DEMO-0001_01.dcm", "DEMO-0002_01.dcm", "DEMO-0003_01.dcm"]
    assert summary["image_ids"] == {"II": ["DEMO-0001_01"], "III": ["DEMO-0002_01"], "IV": ["DEMO-0003_01"]}
    table = read_grades(tmp_path / "grades.csv")
    assert {k: v.grade for k, v in table.grades.items()} == {"DEMO-0001": "II", "DEMO-0002": "III", "DEMO-0003": "IV"}


def test_pydicom_compat_hook():
    """monailabel 0.8.5 -> pydicom_seg 0.4.1 imports pydicom._storage_sopclass_uids, gone in pydicom 3."""
    import pydicom.uid

    spec = importlib.util.spec_from_file_location(
        "sdl_label_compat", REPO_ROOT / "monailabel_app" / "compat" / "sitecustomize.py"
    )
    module = importlib.util.module_from_spec(spec)
    before = list(sys.meta_path)
    spec.loader.exec_module(module)
    try:
        alias = importlib.import_module(module.ALIAS)
        assert alias.SegmentationStorage == pydicom.uid.SegmentationStorage
        module.install()  # idempotent
        assert sum(type(f).__name__ == "StorageUidAlias" for f in sys.meta_path) == 1
    finally:
        sys.meta_path[:] = before
        sys.modules.pop(module.ALIAS, None)


# ---- with monailabel (label environment only) ---------------------------------------------------------------


@pytest.fixture
def keep_scripts_modules():
    """MONAI Label's bundle tasks unload every ``scripts.*`` module; put the test session's own back afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "scripts" or name.startswith("scripts.")}
    yield
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def serving_bundle(tmp_path_factory) -> Path:
    """The bundle with its trained model.pt, or a copy with randomly initialised weights when none is there."""
    if (BUNDLE / "models" / "model.pt").is_file():
        return BUNDLE
    import shutil

    from scripts.network import SDLNet

    copy = tmp_path_factory.mktemp("bundle")
    shutil.copytree(BUNDLE / "configs", copy / "configs")
    shutil.copytree(BUNDLE / "scripts", copy / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "models").mkdir()
    torch.save(SDLNet().state_dict(), copy / "models" / "model.pt")
    return copy


@pytest.mark.skipif(not HAVE_MONAILABEL, reason=NO_MONAILABEL)
def test_infer_task_grades_a_slice(serving_bundle, tmp_path, keep_scripts_modules):
    from scripts.transforms import preprocessing_transforms

    from monailabel_app.lib.infer import SDLGliomaInfer

    summary = make_demo_studies(tmp_path, patients_per_grade=1, slices_per_patient=1)
    image = str(tmp_path / f"{summary['image_ids']['IV'][0]}.dcm")
    task = SDLGliomaInfer(str(serving_bundle), {})
    assert task.is_valid() and task.type == "classification"
    assert task.config()["model_filename"] == ["model.pt"]  # never a resume checkpoint
    label_file, result = task({"image": image, "device": "cpu"})

    assert label_file is None
    assert result["grade"] in ("II", "III", "IV") and sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert [p["label"] for p in result["prediction"]] == ["II", "III", "IV"]
    # the same numbers as the bundle's own chain and network face, on the weights the task loaded (strictly)
    net = task._get_network("cpu", None)
    assert type(net).__name__ == "SDLNet" and not net.training  # MONAI Label re-imports `scripts`: compare by name
    with torch.no_grad():
        expected = net(preprocessing_transforms()({"image": image})["image"][None])[0]
    assert [p["score"] for p in result["prediction"]] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.skipif(not HAVE_MONAILABEL, reason=NO_MONAILABEL)
def test_train_task_builds_bundle_overrides(datastore, tmp_path, keep_scripts_modules):
    from monailabel_app.lib.train import SDLGliomaTrain

    task = SDLGliomaTrain(str(BUNDLE), {}, grades_csv=str(tmp_path / "grades.csv"))
    assert task.is_valid() and task.config()["max_epochs"] == 15
    request = {"model": MODEL_NAME, "val_split": 0.3, "batch_size": 2}
    task._request = request
    records = task._fetch_datalist(request, datastore)
    train, val = task._partition_datalist(records, request)
    assert train == records and val is None
    overrides = {"train#dataset#data": train}
    task._update_overrides(overrides)
    assert [r["image_id"] for r in overrides["records"]] == ["a", "b", "c"]
    assert overrides["val_fraction"] == 0.3 and overrides["batch_size"] == 2 and "train#dataset#data" not in overrides
    with pytest.raises(ValueError, match="no graded image"):
        task._fetch_datalist(request, FakeDatastore({"f": datastore.images["f"]}))
