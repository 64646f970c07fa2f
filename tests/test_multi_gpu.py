"""Distributed data-parallel training: the pair forward goes through DDP, and the multi-GPU config runs under
torchrun (2 CPU processes, gloo) with the writers on rank 0 only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import REPO_ROOT
from scripts.network import SDLNet, SDLPairForward
from scripts.trainer import SDLTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

CONFIGS = "['bundle/configs/train.yaml','bundle/configs/multi_gpu_train.yaml']"


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, so DDP can be exercised in-process."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _pair_loader(batch: int = 4, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image_a": torch.rand(batch, 3, size, size, generator=g),
            "label_a": torch.tensor([0, 1, 2, 0][:batch]),
            "image_b": torch.rand(batch, 3, size, size, generator=g),
            "label_b": torch.tensor([0, 2, 2, 1][:batch]),
        }
    ]


def test_pair_forward_runs_through_ddp_and_reaches_every_parameter(process_group):
    # Zhang's output init: behind zero output layers the first backward gives the backbones zero gradients
    net = SDLNet(backbone="resnet18", hidden_size=16, synergic_hidden=8, random_init="torchvision")
    ddp = DistributedDataParallel(SDLPairForward(net))
    reduced: set[int] = set()

    def hook(state, bucket):  # runs only when DDP's forward prepared the reducer for this backward
        reduced.update(id(p) for p in bucket.parameters())
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, hook)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    trainer = SDLTrainer(device="cpu", max_epochs=1, train_data_loader=_pair_loader(), network=ddp, optimizer=optimizer)
    trainer.run()
    assert trainer.state.output is not None
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{name} got no gradient"
        assert id(p) in reduced, f"{name} was not all-reduced by DDP"
    assert {name.split(".")[0] for name, _ in net.named_parameters()} == {"branches", "heads"}
    # the classifier face and the checkpoint keys are those of the bare network
    assert set(SDLPairForward(net).state_dict()) == {f"net.{k}" for k in net.state_dict()}
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_ddp_around_bare_sdlnet_is_refused(process_group):
    net = SDLNet(backbone="resnet18", hidden_size=16, synergic_hidden=8)
    ddp = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    trainer = SDLTrainer(device="cpu", max_epochs=1, train_data_loader=_pair_loader(), network=ddp, optimizer=optimizer)
    with pytest.raises(TypeError, match="SDLPairForward"):
        trainer._iteration(trainer, _pair_loader()[0])


def test_rank_zero_only_handlers_are_the_writers():
    """multi_gpu_train.yaml keeps train.yaml's writers on rank 0 through the `write_logs` setting, not by list
    position; everything else (validation, pair redraw, lr schedule, seeding) runs on every rank."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle/configs/train.yaml"))

    def switched(handlers: list) -> set[str]:
        return {h["_target_"].split(".")[-1] for h in handlers if "@write_logs" in str(h.get("_disabled_", ""))}

    assert switched(parser["train"]["handlers"]) == {"StatsHandler", "TensorBoardStatsHandler", "ProgressBar"}
    assert switched(parser["validate"]["handlers"]) == {"StatsHandler", "TensorBoardStatsHandler", "BestModelSaver"}
    assert parser.get_parsed_content("train#handlers#4#_disabled_") is False  # one process: every writer on
    multi = ConfigParser.load_config_file(str(REPO_ROOT / "bundle/configs/multi_gpu_train.yaml"))
    assert multi["write_logs"] == "$dist.get_rank() == 0"
    assert not [k for k in multi if "handlers#" in k]  # no handler addressed by position


@pytest.mark.parametrize("backbone", ["resnet18"])
def test_torchrun_two_processes(tmp_path, backbone):
    from scripts.demo_data import generate_demo_dataset

    data = generate_demo_dataset(
        tmp_path / "data", n_patients_per_grade=4, slices_per_series=3, image_size=(72, 64), seed=1
    )
    bundle_root = tmp_path / "bundle_root"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--tee", "3",
        "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS,
        "--dataset_dir", data["dicom_dir"], "--grades_csv", data["grades_csv"],
        "--index_output", str(tmp_path / "datalist.json"),
        "--epochs", "1", "--image_size", "64", "--batch_size", "4", "--num_workers", "0",
        "--bundle_root", str(bundle_root), "--backbone", backbone,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{log[-6000:]}"
    for rank in (0, 1):  # torchrun --tee prefixes every line with [default<local rank>]
        assert any(
            line.startswith(f"[default{rank}]:") and "SDLTrainer - INFO - Engine run finished" in line
            for line in log.splitlines()
        ), f"rank {rank} did not finish training:\n{log[-6000:]}"
    models = bundle_root / "models"  # one set of files: written by rank 0 only
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoint_epoch=1.pt",
        "model.pt",
        "model_metric.json",
        "model_settings.json",
    ]
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    net = SDLNet(backbone=backbone, hidden_size=1024)
    net.load_state_dict(best)  # keys of the bare network, no DDP/SDLPairForward prefix
    last = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert set(last["model"]) == set(net.state_dict())
    assert len(list((bundle_root / "logs").glob("events.out.tfevents*"))) == 2, "TensorBoard writers on rank 0 only"


def test_sdlpairforward_is_a_plain_module():
    net = SDLNet(backbone="resnet18", hidden_size=16, synergic_hidden=8)
    pairs = SDLPairForward(net)
    assert isinstance(pairs, nn.Module) and pairs.head_pairs == net.head_pairs
    images = [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)]
    net.eval()
    torch.testing.assert_close(pairs(*images)["logits"][0], net.forward_pairs(images)["logits"][0])
