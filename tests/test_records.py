import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scripts.handlers import BestModelSaver
from scripts.records import load_datalist, resolve_datalist


def _engine(value: float, epoch: int) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(metrics={"val_acc": value}, epoch=epoch))


def _saved_weight(folder):
    return torch.load(folder / "model.pt", weights_only=True)["weight"]


def test_best_model_saver_keeps_only_improvements_as_a_bare_state_dict(tmp_path):
    net = torch.nn.Linear(2, 3)
    saver = BestModelSaver(net, tmp_path, "val_acc")
    saver(_engine(0.5, 1))
    first = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(first) == {"weight", "bias"} and torch.equal(first["weight"], net.weight)
    with torch.no_grad():
        net.weight.add_(1.0)
    saver(_engine(0.4, 2))  # worse: model.pt keeps epoch 1's weights
    assert torch.equal(_saved_weight(tmp_path), first["weight"])
    saver(_engine(0.6, 3))
    assert torch.equal(_saved_weight(tmp_path), net.weight)
    assert json.loads((tmp_path / "model_metric.json").read_text()) == {"val_acc": 0.6, "epoch": 3}


def test_best_model_saver_remembers_its_best_only_when_resuming(tmp_path):
    net = torch.nn.Linear(2, 3)
    BestModelSaver(net, tmp_path, "val_acc")(_engine(0.8, 4))
    assert BestModelSaver(net, tmp_path, "val_acc", resume=True).best == 0.8
    assert BestModelSaver(net, tmp_path, "val_acc", resume=False).best == float("-inf")


def test_datalist_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.dcm", "label": 0}]))
    with pytest.raises(ValueError, match=r"bad.json.*record 0 lacks \['patient_id'\]"):
        load_datalist(bad)
    with pytest.raises(ValueError, match="needs --grades_csv"):
        resolve_datalist(dicom_source={"dataset_dir": str(tmp_path)})


def _slice(path) -> str:
    from scripts.synthetic_dicom import write_mr_slice

    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    return str(write_mr_slice(path, pixels, patient_id="P1", study_uid="2.25.1", series_uid="2.25.2"))


def test_datalist_in_monai_training_form_is_accepted_and_keeps_the_source_path(tmp_path):
    image = _slice(tmp_path / "a.dcm")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": image, "label": 1, "patient_id": "P1"}]}))
    records = resolve_datalist(datalist=str(path))
    assert records == [{"image": image, "label": 1, "patient_id": "P1", "image_path": image}]


def test_slices_that_cannot_be_loaded_are_left_out_and_listed(tmp_path, caplog):
    good = _slice(tmp_path / "good.dcm")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a DICOM file at all")
    records = [{"image": p, "label": 0, "patient_id": "P1"} for p in (good, str(garbage), str(tmp_path / "gone.dcm"))]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    skipped_csv = tmp_path / "out" / "skipped_loading.csv"
    with caplog.at_level("WARNING"):
        kept = resolve_datalist(datalist=str(path), skipped_csv=str(skipped_csv))
    assert [r["image"] for r in kept] == [good]
    rows = list(csv.DictReader(open(skipped_csv)))
    assert [r["path"] for r in rows] == [str(garbage), str(tmp_path / "gone.dcm")]
    assert {r["reason"] for r in rows} == {"load_failed"}
    assert all(r["detail"] for r in rows) and f"skipped {garbage}" in caplog.text
    path.write_text(json.dumps(records[1:]))
    with pytest.raises(ValueError, match=r"none of the 2 records .* can be loaded; reasons in .*skipped_loading.csv"):
        resolve_datalist(datalist=str(path), skipped_csv=str(skipped_csv))
