"""Engine handlers this bundle adds to MONAI's: the best-model saver and the learning-rate recorder. (The pair
re-drawing lives with the pairs, `scripts.pairs`; the per-epoch re-seeding with the other random state,
`scripts.reproducibility`; the prediction writer with the reports it writes, `scripts.reports`; the resume
checkpoints, `scripts.checkpoints`.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.checkpoints import atomic_save
from scripts.flags import as_flag
from scripts.model_settings import write_model_settings

__all__ = ["BestModelSaver", "LearningRateRecorder"]

logger = logging.getLogger(__name__)


class LearningRateRecorder:
    """Store the optimizer's learning rate in ``engine.state.learning_rate`` at the end of every epoch, so
    `TensorBoardStatsHandler(state_attributes=["learning_rate"])` plots the paper's decay."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.state.learning_rate = self.optimizer.param_groups[0]["lr"]
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.learning_rate = self.optimizer.param_groups[0]["lr"]


class BestModelSaver:
    """Save the network's bare state_dict to ``save_dir/filename`` whenever the evaluator's key metric improves.

    A bare state_dict is what model-zoo bundles ship as ``models/model.pt`` (MONAI's `CheckpointSaver` writes
    a lone object that way): ``ckpt_export`` without ``--key_in_ckpt``, `CheckpointLoader` with
    ``load_dict={"model": net}`` and MONAI Label's bundle tasks all load it as is. The file is
    written to a temporary name and renamed, so an interrupted save never leaves a broken ``model.pt``.
    The best value and its epoch go to ``<filename stem>_metric.json`` beside it; a resumed run
    (``resume=True``) starts from that value, so it only replaces the model with a better one. With ``settings``
    (the config's ``model_settings``), ``model_settings.json`` is written beside the model each time it is saved
    (:mod:`scripts.model_settings`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        save_dir: str | Path,
        metric_name: str,
        filename: str = "model.pt",
        resume: bool = False,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.settings = settings
        self.path = Path(save_dir) / filename
        self.metric_path = self.path.with_name(f"{self.path.stem}_metric.json")
        self.metric_name = metric_name
        self.best = float("-inf")
        if as_flag(resume) and self.path.is_file() and self.metric_path.is_file():
            self.best = float(json.loads(self.metric_path.read_text())[metric_name])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if value <= self.best:
            return
        self.best = value
        network = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel
        atomic_save(network.state_dict(), self.path)
        if self.settings is not None:
            write_model_settings(self.path, self.settings)
        self.metric_path.write_text(json.dumps({self.metric_name: value, "epoch": engine.state.epoch}))
        logger.info("saved %s (%s %.4f)", self.path, self.metric_name, value)
