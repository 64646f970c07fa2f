"""Tests for the SDL engines: pair trainer outputs and events, metrics, lr schedule, evaluator, N=3, learning."""

from __future__ import annotations

import pickle
import string
from collections import Counter

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.engines.utils import IterationEvents
from monai.handlers import LrScheduleHandler, from_engine
from scripts.engine_metrics import engine_metrics, scalar_outputs
from scripts.evaluator import SDLEvaluator
from scripts.lr_schedule import paper_lr_scheduler
from scripts.network import SDLNet
from scripts.trainer import SDLTrainer
from torch.utils.data import DataLoader, Dataset

SIZE, BATCH, CLASSES = 64, 4, 3


class PairDataset(Dataset):
    """Random pairs; with ``learnable`` each class is a distinct constant brightness plus a little noise."""

    def __init__(self, length: int = 8, num_branches: int = 2, learnable: bool = False, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.letters = string.ascii_lowercase[:num_branches]
        self.labels = torch.randint(0, CLASSES, (length, num_branches), generator=gen)
        noise = torch.randn(length, num_branches, 3, SIZE, SIZE, generator=gen)
        if learnable:
            level = self.labels.float().sub(1.0).view(length, num_branches, 1, 1, 1)
            self.images = level + 0.1 * noise
        else:
            self.images = noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        item = {}
        for k, letter in enumerate(self.letters):
            item[f"image_{letter}"] = self.images[idx, k]
            item[f"label_{letter}"] = self.labels[idx, k]
        return item


def _net(num_branches: int = 2, **kwargs) -> SDLNet:
    torch.manual_seed(0)
    return SDLNet(num_branches=num_branches, hidden_size=32, synergic_hidden=16, **kwargs)


def _trainer(net: SDLNet, loader, max_epochs: int = 1, lr: float = 1e-3, **kwargs) -> SDLTrainer:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    return SDLTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=optimizer, **kwargs
    )


def _loader(**kwargs) -> DataLoader:
    return DataLoader(PairDataset(**kwargs), batch_size=BATCH, shuffle=False)


def test_two_epochs_output_and_events():
    trainer = _trainer(_net(), _loader(length=8), max_epochs=2, decollate=False)
    counts: Counter = Counter()
    order: list[str] = []
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):

        def record(engine, name=event.name):
            counts[name] += 1
            if engine.state.iteration == 1:
                order.append(name)

        trainer.add_event_handler(event, record)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()

    assert trainer.state.epoch == 2 and trainer.state.iteration == 4
    assert counts == Counter(
        {"FORWARD_COMPLETED": 4, "LOSS_COMPLETED": 4, "BACKWARD_COMPLETED": 4, "MODEL_COMPLETED": 4}
    )
    assert order == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    out = trainer.state.output
    assert isinstance(out, dict)
    for key in ("loss", "ce_a", "ce_b", "synergic_bce", "synergic_acc"):
        assert out[key].shape == () and torch.isfinite(out[key]) and not out[key].requires_grad
    assert torch.allclose(out["loss"], out["ce_a"] + out["ce_b"] + out["synergic_bce"], atol=1e-5)
    assert 0.0 <= out["synergic_acc"].item() <= 1.0
    assert out["pred"].shape == (2 * BATCH, CLASSES) and out["label"].shape == (2 * BATCH,)
    assert torch.allclose(out["pred"].sum(dim=1), torch.ones(2 * BATCH), atol=1e-5)
    assert out["pred_a"].shape == (BATCH, CLASSES) and out["label_b"].shape == (BATCH,)
    assert torch.equal(out["pred"], torch.cat([out["pred_a"], out["pred_b"]]))
    assert torch.equal(out["label"], torch.cat([out["label_a"], out["label_b"]]))
    assert len(outputs) == 4


def test_first_steps_update_both_branches_and_the_head():
    """The default from-scratch net starts with zero output layers: the first step moves only them (nothing
    reaches the layers behind a zero weight), the second moves everything."""
    net = _net()
    tracked = {
        "branch_a": net.branches[0].backbone.features[0].weight,
        "branch_b": net.branches[1].backbone.features[0].weight,
        "hidden_b": net.branches[1].hidden[0].weight,
        "head": net.heads[0][0].weight,
    }
    before = {k: v.detach().clone() for k, v in tracked.items()}
    output = net.branches[0].classifier[1].weight
    _trainer(net, _loader(length=4), lr=0.1, epoch_length=1, decollate=False).run()
    assert output.abs().sum() > 0
    assert all(torch.equal(param, before[name]) for name, param in tracked.items())
    _trainer(net, _loader(length=4), lr=0.1, epoch_length=1, decollate=False).run()
    for name, param in tracked.items():
        assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize("num_branches", [1, 2, 3])
def test_training_metrics_from_one_factory_equal_the_step_outputs(num_branches):
    """The factory's metrics, on MONAI's decollated trainer output (the default, which ``--tracking`` expects),
    equal what each step computed (its batched output, taken before decollation), for N branches (1 = the
    single-network baseline)."""
    loader = _loader(length=12, num_branches=num_branches)
    if num_branches == 1:  # the baseline trains on plain image/label batches
        loader = [{"image": b["image_a"], "label": b["label_a"]} for b in loader]
    trainer = _trainer(_net(num_branches), loader)
    Accuracy(output_transform=from_engine(["pred", "label"])).attach(trainer, "train_acc")
    for name, metric in engine_metrics("train", num_branches).items():
        metric.attach(trainer, name)
    outputs = []
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    metrics = trainer.state.metrics
    assert isinstance(trainer.state.output, list) and len(trainer.state.output) == num_branches * BATCH
    assert len(outputs) == 3
    synergic = {"train_synergic_acc", "train_synergic_bce"} if num_branches > 1 else set()
    per_branch = {f"train_{kind}_branch{b}" for kind in ("acc", "ce") for b in range(1, num_branches + 1)}
    assert set(metrics) == {"train_acc", "train_loss_epoch"} | per_branch | synergic

    def mean_of(key: str) -> float:
        return float(torch.stack([o[key] for o in outputs]).mean())

    def accuracy_of(pred: str, label: str) -> float:
        preds = torch.cat([o[pred].argmax(dim=1) for o in outputs])
        return float((preds == torch.cat([o[label] for o in outputs])).float().mean())

    assert metrics["train_loss_epoch"] == pytest.approx(mean_of("loss"), abs=1e-6)
    assert metrics["train_acc"] == pytest.approx(accuracy_of("pred", "label"))
    for b, letter in enumerate(string.ascii_lowercase[:num_branches], start=1):
        assert metrics[f"train_ce_branch{b}"] == pytest.approx(mean_of(f"ce_{letter}"), abs=1e-6)
        assert metrics[f"train_acc_branch{b}"] == pytest.approx(accuracy_of(f"pred_{letter}", f"label_{letter}"))
    if synergic:
        assert metrics["train_synergic_bce"] == pytest.approx(mean_of("synergic_bce"), abs=1e-6)
        assert metrics["train_synergic_acc"] == pytest.approx(mean_of("synergic_acc"), abs=1e-6)
    scalars = scalar_outputs(trainer.state.output)  # what TensorBoard plots each step: the scalars only
    assert scalars == {k: pytest.approx(float(v)) for k, v in scalar_outputs(outputs[-1]).items()}
    assert set(scalars) == {"loss"} | {f"ce_{c}" for c in string.ascii_lowercase[:num_branches]} | (
        {"synergic_bce", "synergic_acc"} if synergic else set()
    )
    with pytest.raises(ValueError, match="stage"):
        engine_metrics("test", num_branches)


@pytest.mark.parametrize("decay", [1e-4, 0.5])
def test_lr_follows_inverse_time_decay(decay):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler = paper_lr_scheduler(optimizer, decay=decay)
    trainer = SDLTrainer(
        device="cpu",
        max_epochs=3,
        train_data_loader=_loader(length=4),
        network=net,
        optimizer=optimizer,
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=True, print_lr=False)],
    )
    seen = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.run()
    expected = [0.01 / (1 + decay * epoch) for epoch in range(3)]
    assert seen == pytest.approx(expected, rel=1e-12)

    # the scheduler state (including its lr_lambda) survives a checkpoint round trip
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    fresh = paper_lr_scheduler(torch.optim.SGD(net.parameters(), lr=0.01), decay=0.0)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].decay == decay and fresh.last_epoch == 3


def test_three_branches_train():
    trainer = _trainer(_net(num_branches=3), _loader(length=4, num_branches=3), decollate=False)
    trainer.run()
    out = trainer.state.output
    assert {"ce_a", "ce_b", "ce_c", "pred_c", "label_c"} <= set(out)
    assert out["pred"].shape == (3 * BATCH, CLASSES) and out["label"].shape == (3 * BATCH,)
    assert torch.allclose(out["loss"], out["ce_a"] + out["ce_b"] + out["ce_c"] + 3 * out["synergic_bce"], atol=1e-5)


def test_missing_pair_keys_raise():
    bad = [{"image": torch.zeros(2, 3, SIZE, SIZE), "label": torch.zeros(2, dtype=torch.long)}]
    with pytest.raises(KeyError, match="image_a"):
        _trainer(_net(), bad).run()


def _unpaired_loader(with_labels: bool) -> DataLoader:
    gen = torch.Generator().manual_seed(3)
    items = []
    for i in range(6):
        item = {"image": torch.randn(3, SIZE, SIZE, generator=gen)}
        if with_labels:
            item["label"] = torch.tensor(i % CLASSES)
        items.append(item)
    return DataLoader(items, batch_size=BATCH)


@pytest.mark.parametrize("with_labels", [True, False])
def test_evaluator_outputs(with_labels):
    net = _net()
    evaluator = SDLEvaluator(device="cpu", val_data_loader=_unpaired_loader(with_labels), network=net, decollate=False)
    outputs = []
    evaluator.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run()
    assert len(outputs) == 2
    out = outputs[0]
    assert out["pred"].shape == (BATCH, CLASSES) and out["branch_preds"].shape == (BATCH, 2, CLASSES)
    assert torch.allclose(out["pred"].sum(dim=1), torch.ones(BATCH), atol=1e-5)
    assert torch.allclose(out["pred"], out["branch_preds"].mean(dim=1))
    assert not out["pred"].requires_grad
    assert ("label" in out) == with_labels
    # evaluated in eval mode (dropout off): equals the eager eval-mode ensemble on the first batch
    first = next(iter(_unpaired_loader(with_labels)))["image"]
    with torch.no_grad():
        assert torch.allclose(out["pred"], net.eval()(first), atol=1e-6)


def test_evaluator_metric_with_default_decollate():
    evaluator = SDLEvaluator(
        device="cpu",
        val_data_loader=_unpaired_loader(True),
        network=_net(),
        key_val_metric={"val_acc": Accuracy(output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    assert 0.0 <= evaluator.state.metrics["val_acc"] <= 1.0
    assert evaluator.state.output[0]["branch_preds"].shape == (2, CLASSES)


def test_loss_decreases_on_learnable_task():
    torch.manual_seed(0)
    net = SDLNet(backbone="resnet18", hidden_size=32, synergic_hidden=16, dropout=0.0)
    loader = DataLoader(PairDataset(length=16, learnable=True, seed=1), batch_size=BATCH, shuffle=False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    trainer = SDLTrainer(
        device="cpu", max_epochs=5, train_data_loader=loader, network=net, optimizer=optimizer, decollate=False
    )
    epoch_losses: list[float] = []
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))

    def close_epoch(_):
        epoch_losses.append(sum(losses) / len(losses))
        losses.clear()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, close_epoch)
    trainer.run()
    assert epoch_losses[-1] < 0.7 * epoch_losses[0], epoch_losses
    assert all(b < a for a, b in zip(epoch_losses, epoch_losses[1:], strict=False)), epoch_losses


def test_amp_path_runs_on_cpu():
    """amp=True takes the autocast + GradScaler branch (the scaler disables itself without CUDA)."""
    trainer = _trainer(_net(), _loader(length=4), amp=True, decollate=False)
    trainer.run()
    assert trainer.scaler is not None
    assert torch.isfinite(trainer.state.output["loss"]) and trainer.state.output["pred"].dtype == torch.float32
