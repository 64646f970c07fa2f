"""The MONAI engine that grades single slices with an SDL network: each branch's probabilities and their mean.

One evaluator serves validation during training, `run evaluating` and `run inference`, so the three grade a
slice the same way (flip TTA and ``channels_last`` included).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from scripts.flags import as_flag
from scripts.trainer import memory_format, sdl_net

__all__ = ["SDLEvaluator"]


class SDLEvaluator(SupervisedEvaluator):
    """Evaluates (or infers on) unpaired batches ``{"image": [B,3,H,W], "label": [B] (optional)}``.

    Runs the branches once through ``engine.inferer`` on ``network.branch_probabilities`` (DDP/compile wrappers and
    ``SDLPairForward`` are unwrapped) and outputs ``pred`` = the branch mean ``[B, C]`` (the default prediction),
    ``branch_preds`` ``[B, N, C]`` and ``label`` when the batch has one. Same constructor as ``SupervisedEvaluator``,
    plus ``tta_flip``: when True the inferer is wrapped in :class:`scripts.tta.FlipTTAInferer`, so every branch's
    probabilities (and hence ``pred``) are the mean over the image and its left-right mirror. It lives here, not
    in each config's ``inferer``, so validation, ``run evaluating`` and ``run inference`` switch it the same way;
    and ``channels_last`` (:func:`memory_format`).
    """

    def __init__(self, *args: Any, tta_flip: bool = False, channels_last: bool = False, **kwargs: Any) -> None:
        from scripts.tta import FlipTTAInferer

        super().__init__(*args, **kwargs)
        self.memory_format = memory_format(self.network, channels_last)
        self.tta_flip = as_flag(tta_flip)  # `--tta_flip false` arrives as the string "false"
        if self.tta_flip:
            self.inferer = FlipTTAInferer(self.inferer)

    def _iteration(self, engine: SDLEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0].contiguous(memory_format=engine.memory_format), batch[1]
        net = sdl_net(engine.network)
        with engine.mode(engine.network):
            if engine.amp:
                with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs):
                    branch_preds = engine.inferer(inputs, net.branch_probabilities)
            else:
                branch_preds = engine.inferer(inputs, net.branch_probabilities)
        branch_preds = branch_preds.float()
        engine.state.output = {Keys.IMAGE: inputs, Keys.PRED: branch_preds.mean(dim=1), "branch_preds": branch_preds}
        if targets is not None:
            engine.state.output[Keys.LABEL] = targets
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
