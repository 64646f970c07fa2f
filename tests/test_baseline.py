"""Single-network baselines (baseline.yaml over train.yaml): one SDL branch without head, trained on single slices
by the same SDLTrainer step, on exactly SDL's records, split and transforms; one short run through the bundle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT, bundle_run
from monai.bundle import ConfigParser
from scripts.network import SDLNet
from scripts.trainer import SDLTrainer
from test_image_folder import write_dataset

TRAIN = str(REPO_ROOT / "bundle/configs/train.yaml")
BASELINE = str(REPO_ROOT / "bundle/configs/baseline.yaml")
EVALUATE = str(REPO_ROOT / "bundle/configs/evaluate.yaml")
SMALL = ["--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--hidden_size", "32"]


def _records() -> list[dict]:
    """Three slices per patient, six patients per grade: enough for a patient-level three-way split."""
    return [
        {"image": f"/data/P{g}{p}/{s}.dcm", "label": g, "patient_id": f"P{g}{p}"}
        for g in range(3)
        for p in range(6)
        for s in range(3)
    ]


def _parser(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    for key, value in {"records": _records(), "device": "$torch.device('cpu')", **overrides}.items():
        parser[key] = value
    return parser


def test_baseline_network_has_one_branch_and_no_head():
    parser = _parser(TRAIN, BASELINE, backbone="resnet18", hidden_size=32)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SDLNet) and net.num_branches == 1
    assert len(net.branches) == 1 and len(net.heads) == 0 and net.head_pairs == []
    x = torch.rand(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        logits, _ = net.branches[0](x)
        torch.testing.assert_close(net(x), torch.softmax(logits, dim=1))  # forward = the branch's softmax
        assert net.branch_probabilities(x).shape == (2, 1, 3)


def test_baseline_uses_sdl_split_and_transforms_for_the_same_seed():
    sdl, baseline = _parser(TRAIN, seed=4), _parser(TRAIN, BASELINE, seed=4)
    sdl_splits, baseline_splits = sdl.get_parsed_content("splits"), baseline.get_parsed_content("splits")
    for part in ("train", "validation", "test"):
        assert [r["image"] for r in baseline_splits[part]] == [r["image"] for r in sdl_splits[part]]
    for key in ("train#preprocessing", "validate#preprocessing"):
        assert baseline.get(key) == sdl.get(key)
    dataset, pairs = baseline.get("train#dataset"), sdl.get("train#dataset")  # same records, same transform
    assert dataset["transform"] == pairs["transform"] and dataset["data"] == pairs["records"]
    assert baseline.get("validate#evaluator") == sdl.get("validate#evaluator")
    # one branch has no groups to re-draw: train.yaml switches the pair re-drawing off by setting, not by position
    assert sdl.get("train#handlers#0")["_target_"] == "scripts.pairs.GroupRedrawHandler"
    assert sdl.get_parsed_content("train#handlers#0#_disabled_") is False
    assert baseline.get_parsed_content("train#handlers#0#_disabled_") is True
    assert baseline.get("train#handlers") == sdl.get("train#handlers")
    assert baseline.get_parsed_content("ckpt_dir").endswith("baselines/alexnet/models")


def _single_loader(n: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(4, 3, 32, 32, generator=gen), "label": torch.randint(0, 3, (4,), generator=gen)}
        for _ in range(n // 4)
    ]


def test_trainer_trains_one_branch_on_single_images_with_ce_only():
    net = SDLNet(backbone="resnet18", num_branches=1, hidden_size=16)
    trainer = SDLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_single_loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        decollate=False,
    )
    before = net.branches[0].classifier[1].weight.detach().clone()
    trainer.run()
    out = trainer.state.output
    assert torch.allclose(out["loss"], out["ce_a"]) and "synergic_bce" not in out
    assert out["pred"].shape == (4, 3) and out["label"].shape == (4,)
    assert not torch.equal(before, net.branches[0].classifier[1].weight)


def test_two_branch_network_still_refuses_single_images():
    net = SDLNet(backbone="resnet18", num_branches=2, hidden_size=16, synergic_hidden=8)
    trainer = SDLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_single_loader(4),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
    )
    with pytest.raises(KeyError, match="image_a"):
        trainer.run()


def test_baseline_trains_and_evaluates_through_the_bundle(tmp_path):
    data = write_dataset(tmp_path / "images", n_train=5, split_folders=False)
    root = tmp_path / "bundle_root"
    args = ["--image_folder", str(data), *SMALL, "--backbone", "resnet18", "--bundle_root", str(root)]
    log = bundle_run("training", f"['{TRAIN}','{BASELINE}']", *args, "--epochs", "1")
    assert "Epoch[1] Complete" in log
    out_dir = root / "baselines" / "resnet18"
    state = torch.load(out_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("heads.", "branches.1.")) for k in state)  # bare state_dict of one branch
    assert list((out_dir / "models").glob("checkpoint*epoch=1.pt")) and not (root / "models").exists()

    bundle_run("evaluating", f"['{TRAIN}','{BASELINE}','{EVALUATE}']", *args)
    metrics = json.loads((out_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["slice_level"]) == {"ensemble", "branch1"} and metrics["split"] == "test"
    assert metrics["slice_level"]["ensemble"] == metrics["slice_level"]["branch1"]
    assert list(metrics["slice_level"]["ensemble"]["per_class"]) == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (out_dir / "eval" / "predictions.csv").is_file() and (out_dir / "eval" / "patients.csv").is_file()
