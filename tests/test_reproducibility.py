"""Same command, same numbers; a resumed run ends exactly where the uninterrupted one does.

Tiny runs through `python -m monai.bundle` with two DataLoader workers, so the workers' seeds, the batch order,
the re-drawn pairs, the rotations and dropout are all exercised (scripts/reproducibility.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import bundle_run

TRAIN = "bundle/configs/train.yaml"
TINY = ["--image_size", "64", "--batch_size", "4", "--num_workers", "2", "--hidden_size", "64"]


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> str:
    from scripts.demo_data import generate_demo_dataset

    tiny = generate_demo_dataset(
        tmp_path_factory.mktemp("tiny"), n_patients_per_grade=3, slices_per_series=3, image_size=(64, 64), seed=2
    )
    out = tmp_path_factory.mktemp("index") / "datalist.json"
    bundle_run(
        "indexing",
        TRAIN,
        "--dataset_dir",
        tiny["dicom_dir"],
        "--grades_csv",
        tiny["grades_csv"],
        "--datalist",
        str(out),
    )
    return str(out)


def epoch_metrics(log: str) -> dict[int, list[str]]:
    """Every ``Epoch[k] Metrics -- ...`` line (trainer and evaluator) of a log, by epoch."""
    lines: dict[int, list[str]] = {}
    for epoch, metrics in re.findall(r"Epoch\[(\d+)\] Metrics -- (.*)", log):
        lines.setdefault(int(epoch), []).append(metrics.strip())
    return lines


def last_weights(root: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = (root / "models").glob("checkpoint*epoch=2.pt")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def train(datalist: str, root: Path, *extra: str) -> str:
    return bundle_run("training", TRAIN, "--datalist", datalist, *TINY, "--bundle_root", str(root), *extra)


@pytest.fixture(scope="module")
def uninterrupted(datalist, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    return epoch_metrics(train(datalist, root, "--epochs", "2")), root


def test_same_command_twice_gives_identical_metrics(datalist, uninterrupted, tmp_path):
    metrics, root = uninterrupted
    again = epoch_metrics(train(datalist, tmp_path, "--epochs", "2"))
    assert set(metrics) == {1, 2} and len(metrics[2]) == 2  # trainer and evaluator lines
    assert again == metrics
    for name, tensor in last_weights(root).items():
        torch.testing.assert_close(last_weights(tmp_path)[name], tensor, rtol=0, atol=0, msg=name)


def test_resumed_run_equals_uninterrupted_run(datalist, uninterrupted, tmp_path):
    metrics, root = uninterrupted
    first = epoch_metrics(train(datalist, tmp_path, "--epochs", "1"))
    assert first[1] == metrics[1]
    resumed = epoch_metrics(train(datalist, tmp_path, "--epochs", "2", "--resume", "true"))
    assert set(resumed) == {2}, "the resumed run starts at epoch 2"
    assert resumed[2] == metrics[2]
    resumed_weights, weights = last_weights(tmp_path), last_weights(root)
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0, msg=name)


def test_another_seed_gives_other_metrics(datalist, uninterrupted, tmp_path):
    """The check above could pass on a run that ignores every random draw; a new seed must change it."""
    metrics, _ = uninterrupted
    assert epoch_metrics(train(datalist, tmp_path, "--epochs", "2", "--seed", "1")) != metrics
