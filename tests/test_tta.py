"""Flip test-time augmentation: the inferer's arithmetic, the mirror axis, and the config switch end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import bundle_run
from monai.transforms import Flip
from scripts.evaluator import SDLEvaluator
from scripts.flags import as_flag
from scripts.network import SDLNet
from scripts.tta import FlipTTAInferer, flip_images
from torch.utils.data import DataLoader

EVALUATE = "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']"
# Zhang's initialisation of the output layers: a from-scratch default net starts at exactly p = 1/3 (zero output
# layers, scripts/network.py), which would leave nothing here to compare
NET = {"backbone": "resnet18", "hidden_size": 16, "random_init": "torchvision"}


@pytest.fixture(scope="module")
def net() -> SDLNet:
    torch.manual_seed(0)
    return SDLNet(**NET).eval()


def _images(n: int = 3, size: int = 40) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size - 8)  # not square, so a wrong axis changes the shape checks below


def test_flip_is_the_left_right_mirror_monai_flip_gives_one_image():
    """(C, x=columns, y=rows): a left-right mirror reverses the columns, spatial axis 0, batch dim 2."""
    batch = _images()
    flipped = flip_images(batch)
    for image, mirrored in zip(batch, flipped, strict=True):
        assert torch.equal(torch.as_tensor(Flip(spatial_axis=0)(image)), mirrored)
    assert torch.equal(flipped[:, :, 0], batch[:, :, -1])  # first column <- last column; rows untouched
    with pytest.raises(ValueError):
        flip_images(batch, spatial_axis=2)


def test_tta_is_the_mean_of_the_image_and_its_mirror(net):
    x = _images()
    tta = FlipTTAInferer()
    with torch.no_grad():
        manual = (net(x) + net(flip_images(x))) / 2
        manual_branches = (net.branch_probabilities(x) + net.branch_probabilities(flip_images(x))) / 2
        assert torch.allclose(tta(x, net), manual, atol=1e-6)
        assert torch.allclose(tta(x, net.branch_probabilities), manual_branches, atol=1e-6)
        # the random network is not mirror-invariant, so the comparison above is not trivially true
        assert not torch.allclose(net(x), manual, atol=1e-4)


def test_mirror_symmetric_image_is_unchanged_by_tta(net):
    x = _images()
    symmetric = (x + flip_images(x)) / 2
    with torch.no_grad():
        tta = FlipTTAInferer()(symmetric, net.branch_probabilities)
        assert torch.allclose(tta, net.branch_probabilities(symmetric))


def _evaluate(net: SDLNet, images: torch.Tensor, **kwargs) -> dict:
    loader = DataLoader([{"image": img, "label": 0} for img in images], batch_size=len(images))
    evaluator = SDLEvaluator(device="cpu", val_data_loader=loader, network=net, decollate=False, **kwargs)
    evaluator.run()
    return evaluator.state.output


def test_evaluator_switch_averages_ensemble_and_every_branch(net):
    x = _images()
    plain, tta = _evaluate(net, x), _evaluate(net, x, tta_flip=True)
    with torch.no_grad():
        branches = (net.branch_probabilities(x) + net.branch_probabilities(flip_images(x))) / 2
    assert torch.allclose(plain["branch_preds"], net.branch_probabilities(x).detach(), atol=1e-6)
    assert torch.allclose(tta["branch_preds"], branches, atol=1e-6)
    assert torch.allclose(tta["pred"], branches.mean(dim=1), atol=1e-6)


def test_command_line_text_switches_are_read_as_meant(net):
    """`--tta_flip false` reaches the config as the string "false", which plain bool() would call True."""
    assert [as_flag(v) for v in ("true", "True", "1", "yes", True)] == [True] * 5
    assert [as_flag(v) for v in ("false", "False", "0", "no", "null", False, None)] == [False] * 7
    with pytest.raises(ValueError):
        as_flag("maybe")
    loader = DataLoader([{"image": torch.zeros(3, 8, 8)}])
    assert not SDLEvaluator(device="cpu", val_data_loader=loader, network=net, tta_flip="false").tta_flip
    assert isinstance(
        SDLEvaluator(device="cpu", val_data_loader=loader, network=net, tta_flip="true").inferer, FlipTTAInferer
    )


@pytest.fixture(scope="module")
def tiny_datalist(tmp_path_factory) -> Path:
    from scripts.demo_data import generate_demo_dataset
    from scripts.dicom_index import write_datalist

    root = tmp_path_factory.mktemp("tta_data")
    data = generate_demo_dataset(root, n_patients_per_grade=4, slices_per_series=2, image_size=(72, 64), seed=1)
    write_datalist(data["dicom_dir"], data["grades_csv"], root / "datalist.json", workers=1)
    return root / "datalist.json"


def test_config_switch_reaches_the_evaluator(tiny_datalist, net, tmp_path):
    """`run evaluating --tta_flip true` writes, for every test slice, the mean over the slice and its mirror."""
    from scripts.transforms import preprocessing_transforms

    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")  # as BestModelSaver writes it
    out = tmp_path / "eval"
    bundle_run(
        "evaluating", EVALUATE,
        "--datalist", str(tiny_datalist), "--bundle_root", str(tmp_path), "--output_dir", str(out),
        "--image_size", "64", "--num_workers", "0", "--device", "cpu", "--tta_flip", "true",
        "--backbone", NET["backbone"], "--hidden_size", str(NET["hidden_size"]),
        timeout=300,
    )  # fmt: skip

    assert json.loads((out / "metrics.json").read_text())["tta_flip"] is True
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    preprocess = preprocessing_transforms(image_size=64)
    x = torch.stack([preprocess({"image": row["image_path"]})["image"].as_tensor() for row in rows])
    with torch.no_grad():
        plain = net.branch_probabilities(x)
        tta = (plain + net.branch_probabilities(flip_images(x))) / 2
    written = torch.tensor([[float(row[f"p_{c}"]) for c in ("II", "III", "IV")] for row in rows])
    branch1 = torch.tensor([[float(row[f"branch1_p_{c}"]) for c in ("II", "III", "IV")] for row in rows])
    assert torch.allclose(written, tta.mean(dim=1), atol=2e-6)
    assert torch.allclose(branch1, tta[:, 0], atol=2e-6)
    assert not torch.allclose(written, plain.mean(dim=1), atol=1e-4), "TTA left the predictions unchanged"
