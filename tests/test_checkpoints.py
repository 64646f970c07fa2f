"""Resume checkpoints: every N epochs, one file at a time, atomic, and the last finished epoch on an error or Ctrl-C."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from scripts.checkpoints import ResumeCheckpointer, atomic_save, latest_checkpoint, resume_handlers, run_training


def _trainer(max_epochs: int, fail_in_epoch: int | None = None, error: type[BaseException] = RuntimeError):
    """A tiny engine training a Linear layer with SGD; it raises ``error`` in iteration 2 of ``fail_in_epoch``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights_after_epoch = {}

    def step(engine, batch):
        if engine.state.epoch == fail_in_epoch and engine.state.iteration % 4 == 2:
            raise error("stopped")
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = _Trainer(step, [torch.randn(2, 3) for _ in range(4)], max_epochs)
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: weights_after_epoch.__setitem__(e.state.epoch, model.weight.clone())
    )
    return engine, model, optimizer, weights_after_epoch


class _Trainer(Engine):
    """An Ignite engine whose ``run()`` takes no arguments, as MONAI's trainers (and ``run_training``) expect."""

    def __init__(self, step, data, max_epochs):
        super().__init__(step)
        self.data, self.epochs = data, max_epochs

    def run(self):  # type: ignore[override]
        return super().run(self.data, max_epochs=self.epochs)


def test_interval_writes_every_n_epochs_and_after_the_last_keeping_one_file(tmp_path):
    engine, model, optimizer, weights = _trainer(5)
    written = []
    checkpointer = ResumeCheckpointer(tmp_path, {"model": model, "optimizer": optimizer, "trainer": engine}, 2)
    checkpointer.attach(engine)
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: written.append(sorted(p.name for p in tmp_path.iterdir()))
    )
    run_training(engine, checkpointer)
    assert written == [
        [],
        ["checkpoint_epoch=2.pt"],
        ["checkpoint_epoch=2.pt"],
        ["checkpoint_epoch=4.pt"],
        ["checkpoint_epoch=5.pt"],
    ]
    state = torch.load(tmp_path / "checkpoint_epoch=5.pt", weights_only=True)
    assert torch.equal(state["model"]["weight"], weights[5])
    assert state["trainer"]["iteration"] == 5 * 4  # the engine restarts at epoch 5's end


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_stopped_run_writes_the_last_finished_epoch_not_the_broken_one(tmp_path, error):
    engine, model, optimizer, weights = _trainer(6, fail_in_epoch=4, error=error)
    checkpointer = ResumeCheckpointer(tmp_path, {"model": model, "optimizer": optimizer, "trainer": engine}, 5)
    checkpointer.attach(engine)
    with pytest.raises(error, match="stopped"):
        run_training(engine, checkpointer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)
    assert torch.equal(state["model"]["weight"], weights[3])  # the epoch-3 state, not the half-trained epoch 4
    assert not torch.equal(model.weight, weights[3])  # the live model had moved on
    assert state["trainer"]["iteration"] == 3 * 4
    assert set(state["optimizer"]["state"]) == {0, 1}  # momentum buffers travel too


def test_resume_loads_the_newest_checkpoint_and_a_reader_only_rank_writes_nothing(tmp_path):
    engine, model, optimizer, weights = _trainer(3)
    run_training(engine, ResumeCheckpointer(tmp_path, {"model": model, "optimizer": optimizer, "trainer": engine}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]

    engine, model, optimizer, _ = _trainer(5)  # a fresh model, as a resumed process builds it
    loaded = {}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: loaded.setdefault("weight", model.weight.clone()))
    reader = ResumeCheckpointer(
        tmp_path, {"model": model, "optimizer": optimizer, "trainer": engine}, resume="true", write=False
    )
    reader.attach(engine)
    run_training(engine, reader)  # attaching again changes nothing: the checkpoint is loaded once
    assert torch.equal(loaded["weight"], weights[3])  # epoch 4 started from epoch 3's weights
    assert engine.state.epoch == 5 and engine.state.iteration == 5 * 4  # epochs 4 and 5 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]  # wrote nothing


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        ResumeCheckpointer(tmp_path, {"model": torch.nn.Linear(1, 1)}, 0)


def test_atomic_save_leaves_the_old_file_when_a_save_fails(tmp_path):
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "model.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no partial file left behind


def test_latest_checkpoint_picks_the_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_a_damaged_last_checkpoint_is_a_clear_error_that_offers_the_previous_one(tmp_path):
    net = torch.nn.Linear(2, 2)
    atomic_save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    whole = atomic_save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(whole[: len(whole) // 2])  # as a copy cut short
    with pytest.raises(ValueError, match=r"checkpoint_epoch=2.pt is damaged .*checkpoint_epoch=1.pt is readable"):
        resume_handlers(True, str(tmp_path), {"model": net})
    (tmp_path / "checkpoint_epoch=1.pt").unlink()
    with pytest.raises(ValueError, match=r"is damaged .*--resume false --overwrite true") as error:
        resume_handlers("true", str(tmp_path), {"model": net})
    assert "is readable" not in str(error.value)
