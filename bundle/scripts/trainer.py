"""The MONAI engine that trains Synergic Deep Learning: one step over N-tuples of slices, N CEs and the synergic BCEs.

``SDLTrainer`` overrides ``SupervisedTrainer._iteration`` (not ``iteration_update``, which would bypass AMP, the
GradScaler and MONAI's iteration events) so handlers, metrics and ``from_engine`` keep working.
The synergic weight lambda is *not* in the loss: it lives in the network's gradient scaling (see
``scripts.network.scale_gradient``), so the total loss is simply ``sum(CE_i) + sum(BCE_heads)``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.utils import CommonKeys as Keys
from torch import nn

from scripts.flags import as_flag
from scripts.network import SDLPairForward
from scripts.pool_fold import check_optimizer

__all__ = ["SDLTrainer", "branch_letters", "memory_format", "sdl_net"]


def branch_letters(num_branches: int) -> list[str]:
    """Batch key suffixes of the branches: ``a``, ``b``, ``c``, ... (``image_a``, ``label_a``, ...)."""
    if not 1 <= num_branches <= len(string.ascii_lowercase):
        raise ValueError(f"num_branches must be in [1, 26], got {num_branches}.")
    return list(string.ascii_lowercase[:num_branches])


def memory_format(network: nn.Module, channels_last: bool) -> torch.memory_format:
    """Put ``network``'s 4-D weights in ``channels_last`` (NHWC) order when asked; return the format its inputs need.

    Convolutions on CPU (oneDNN) and on CUDA tensor cores run faster on NHWC data; the weights are converted in
    place, so the trainer and the evaluator that share the network agree, and state_dicts load either way.
    """
    if not as_flag(channels_last):
        return torch.contiguous_format
    network.to(memory_format=torch.channels_last)
    return torch.channels_last


def _unwrap(network: nn.Module) -> nn.Module:
    """The module behind DataParallel / DistributedDataParallel / torch.compile wrappers."""
    network = getattr(network, "_orig_mod", network)
    return getattr(network, "module", network)


def sdl_net(network: nn.Module) -> nn.Module:
    """The bare SDLNet behind those wrappers and an ``SDLPairForward``."""
    network = _unwrap(network)
    return network.net if isinstance(network, SDLPairForward) else network


def _forward_pairs(network: nn.Module, images: list) -> tuple[dict, nn.Module]:
    """Run the pair forward, through ``network.__call__`` when ``network`` wraps an ``SDLPairForward`` (so
    DistributedDataParallel's forward runs and gradients are synchronised); return ``(outputs, bare SDLNet)``."""
    inner = _unwrap(network)
    if isinstance(inner, SDLPairForward):
        return network(*images), inner.net
    if isinstance(network, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "SDLTrainer got DistributedDataParallel(SDLNet): its pair forward would bypass DDP and the gradients "
            "would not be synchronised; wrap SDLPairForward(net) instead (see bundle/configs/multi_gpu_train.yaml)."
        )
    return inner.forward_pairs(images), inner


class SDLTrainer(SupervisedTrainer):
    """Trains an ``SDLNet`` on pair batches ``{"image_a", "label_a", "image_b", "label_b", ...}``.

    Branch i (letter a, b, c, ...) classifies ``image_<letter>``; the target of each synergic head (i, j) is
    ``label_i == label_j``, computed from the labels (a ``synergic_label`` key in the batch is therefore not needed
    and, if present, ignored). ``prepare_batch`` is not used: pair batches do not fit its image/label contract,
    every tensor in the batch is moved to the device instead.

    ``engine.state.output`` (a dict, detached tensors):
        ``loss`` total loss; ``ce_a``, ``ce_b``, ... per-branch cross-entropy; ``synergic_bce`` mean BCE over heads;
        ``synergic_acc`` fraction of correct same/different decisions over all heads;
        ``pred`` ``[N*B, C]`` each branch's probabilities for its own images and ``label`` ``[N*B]`` (so
        ``from_engine(["pred", "label"])`` gives training accuracy); ``pred_a``/``label_a``, ... per branch.

    MONAI decollates this dict into ``N*B`` per-sample dicts after ``MODEL_COMPLETED`` (``decollate=True``, as in
    SupervisedTrainer, which MONAI's ``--tracking`` handlers expect): scalars are repeated in each, ``pred_a``/
    ``label_a``... are padded with None past ``B`` samples. ``from_engine`` and
    :func:`scripts.engine_metrics.engine_metrics` read that form; ``decollate=False`` keeps the batched dict.
    ``network`` is an ``SDLNet``, or for DistributedDataParallel ``DDP(SDLPairForward(net))``, which the pair
    forward is called through (``DDP(SDLNet)`` is refused: it would bypass DDP). A network with folded pooling
    (``scripts.pool_fold``) needs an optimizer built on ``parameter_groups``; another is refused. Extra args:
    ``synergic_loss`` (default ``BCEWithLogitsLoss``); ``loss_function`` is the per-branch classification loss
    (default ``CrossEntropyLoss``); ``optim_set_to_none`` defaults to True; ``channels_last`` puts the network's
    weights and each batch in NHWC order (:func:`memory_format`).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        inferer: Any = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        synergic_loss: Callable | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=nn.CrossEntropyLoss() if loss_function is None else loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            inferer=inferer,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            train_handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            compile=compile,
            compile_kwargs=compile_kwargs,
            accumulation_steps=accumulation_steps,
        )
        self.synergic_loss = nn.BCEWithLogitsLoss() if synergic_loss is None else synergic_loss
        check_optimizer(sdl_net(network), optimizer)  # a folded network needs its learning-rate groups
        self.memory_format = memory_format(network, channels_last)

    def _to_device(self, engine: SDLTrainer, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)
        return value

    def _accumulation_flags(self, engine: SDLTrainer) -> tuple[bool, bool]:
        """(zero the gradients now, step the optimizer now), as SupervisedTrainer decides them."""
        acc = engine.accumulation_steps
        if acc <= 1:
            return True, True
        epoch_length = engine.state.epoch_length
        local_iter = (engine.state.iteration - 1) % epoch_length if epoch_length else engine.state.iteration - 1
        last = epoch_length is not None and (local_iter + 1) == epoch_length
        return local_iter % acc == 0, (local_iter + 1) % acc == 0 or last

    def _compute_losses(self, engine: SDLTrainer, images: list, labels: list) -> torch.Tensor:
        """Forward the pairs, fill ``engine.state.output`` and return the (undetached) total loss."""
        # through the configured inferer (train#inferer), as SupervisedTrainer runs its forward
        out, net = engine.inferer(images[0], lambda *batch: _forward_pairs(engine.network, list(batch)), *images[1:])
        letters = branch_letters(len(images))
        state: dict[str, Any] = {}
        preds = []
        for letter, logits, label in zip(letters, out["logits"], labels, strict=True):
            probs = torch.softmax(logits.detach().float(), dim=1)
            preds.append(probs)
            state[f"pred_{letter}"], state[f"label_{letter}"] = probs, label
        state[Keys.PRED], state[Keys.LABEL] = torch.cat(preds), torch.cat(labels)
        engine.state.output = state
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        ces = [engine.loss_function(logits, label).mean() for logits, label in zip(out["logits"], labels, strict=True)]
        bces, correct = [], []
        for logit, (i, j) in zip(out["synergic_logits"], net.head_pairs, strict=True):
            target = (labels[i] == labels[j]).to(logit.dtype)
            bces.append(self.synergic_loss(logit, target).mean())
            correct.append(((logit.detach() > 0) == target.bool()).float())
        total = torch.stack(ces + bces).sum()  # a single-branch baseline has no head: CE only
        for letter, ce in zip(letters, ces, strict=True):
            state[f"ce_{letter}"] = ce.detach()
        if bces:
            state["synergic_bce"] = torch.stack(bces).detach().mean()
            state["synergic_acc"] = torch.cat(correct).mean()
        state[Keys.LOSS] = total.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        return total

    def _iteration(self, engine: SDLTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One SDL step: N branch CEs + C(N,2) synergic BCEs, backward, optimizer step (AMP-aware).

        A 1-branch network (the single-network baseline, baseline.yaml) also takes unpaired ``image``/``label``
        batches and is trained on its CE alone, through the same step, so both arms share AMP, accumulation,
        handlers and output keys (``loss``, ``ce_a``, ``pred``, ``pred_a``, ...; no ``synergic_*``).
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = {k: self._to_device(engine, v) for k, v in batchdata.items()}
        letters = [c for c in string.ascii_lowercase if f"image_{c}" in batch]
        if not letters and "image" in batch and getattr(sdl_net(engine.network), "num_branches", 0) == 1:
            # single-network baseline: plain {"image", "label"} batches (MONAI datasets of single slices)
            image = batch["image"]
            images = [image.as_tensor() if hasattr(image, "as_tensor") else image]
            labels = [torch.as_tensor(batch["label"], device=images[0].device).long().view(-1)]
        elif len(letters) < 2 or letters != branch_letters(len(letters)):
            raise KeyError(
                f"Pair batches need image_a, image_b, ... with label_* (or image/label for a 1-branch network); "
                f"got keys {sorted(batch)}."
            )
        else:
            images = [batch[f"image_{c}"] for c in letters]
            labels = [batch[f"label_{c}"].long().view(-1) for c in letters]
        images = [image.contiguous(memory_format=engine.memory_format) for image in images]

        zero_grad, step = self._accumulation_flags(engine)
        acc = engine.accumulation_steps
        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs):
                loss = self._compute_losses(engine, images, labels)
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            loss = self._compute_losses(engine, images, labels)
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if step:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
