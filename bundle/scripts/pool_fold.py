"""Fold a replicating adaptive average pooling into the fully connected layer after it: same model, fewer weights.

torchvision's AlexNet pools its last feature map to 6 x 6 (``AdaptiveAvgPool2d((6, 6))``) before the first
fully connected layer (9216 -> 4096). At 128 px that map is 3 x 3, so the pooling only copies each cell into a
2 x 2 block: the layer holds 4 weights for every input it really sees (37.7M per branch, 60 % of SDL's
parameters), and its backward pass and optimizer update do 4 x the necessary work.

Forward. Pooling is linear: ``pooled = P x`` per channel, ``P`` of shape ``(36, h*w)``. So ``W pooled = (W P) x``:
:class:`FoldedPoolLinear` holds ``W' = W P`` and reads the unpooled map directly. That is exact for every input
size, also where the pooling averages overlapping windows (e.g. a 4 x 4 map).

Training. When ``P`` only replicates (every output cell copies one input cell, every input cell is copied ``r``
times; ``P^T P = r I``), the ``r`` copies of a weight column in ``W`` receive the same gradient, so under SGD
(with momentum, Nesterov, weight decay), AdamW, or Adam without weight decay they receive the same update, and
their sum ``W'`` moves by ``r`` x the update that the optimizer computes from ``W'``'s own gradient. Giving ``W'``
``r`` x the learning rate (and ``1/r`` x the weight decay, which is proportional to the weight) reproduces the
unfolded model step for step: :func:`parameter_groups` builds those optimizer groups, and a test checks one step
of each optimizer to 1e-6. Adam with (coupled) weight decay is not exact and is refused by the trainer.

Dropout: torchvision applies ``Dropout`` to the pooled 9216-vector, i.e. independently to each copy of a cell;
after the fold it falls on the 2304 distinct values. Same rate and expectation, but the copies of a value are
now dropped together. That is the one way folded training differs from the unfolded model;
``fold_pooling: false`` keeps torchvision's layout exactly.

State dicts keep torchvision's key names; the folded weight is ``[out, C*h*w]``. An unfolded ``[out, C*36]``
weight (an older ``model.pt``, ImageNet weights) is folded when it is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FoldedPoolLinear",
    "MapSizeCheck",
    "check_optimizer",
    "fold_backbone_pooling",
    "parameter_groups",
    "pooling_matrix",
    "replication_count",
]


def pooling_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """``P`` of ``adaptive_avg_pool2d`` from ``in_hw`` to ``out_hw`` on one channel: ``(out_h*out_w, in_h*in_w)``."""
    n = in_hw[0] * in_hw[1]
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, *in_hw)
    return F.adaptive_avg_pool2d(basis, out_hw).flatten(1).T.contiguous()


def replication_count(matrix: torch.Tensor) -> int | None:
    """``r`` when ``P`` copies every input cell ``r`` times and averages nothing (``P^T P = r I``), else None."""
    if not torch.all((matrix == 0) | (matrix == 1)) or not torch.all(matrix.sum(1) == 1):
        return None
    counts = matrix.sum(0)
    return int(counts[0]) if torch.all(counts == counts[0]) else None


class FoldedPoolLinear(nn.Linear):
    """``Linear(pool(x))`` as one ``Linear`` on the flattened unpooled map: weight ``W P`` per channel block.

    ``replication`` is ``r`` when the pooling only replicates (see module doc), else None (the fold is exact in
    the forward pass, but no learning-rate rule makes training exact). ``pooled_in_features`` is the width of the
    unfolded layer, so unfolded weights can be recognised and folded on load.
    """

    def __init__(self, linear: nn.Linear, channels: int, map_hw: tuple[int, int], pool_hw: tuple[int, int]) -> None:
        matrix = pooling_matrix(map_hw, pool_hw)
        super().__init__(
            channels * map_hw[0] * map_hw[1],
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        self.channels, self.map_hw, self.pool_hw = channels, tuple(map_hw), tuple(pool_hw)
        self.pooled_in_features = linear.in_features
        self.replication = replication_count(matrix)
        self.register_buffer("_pooling", matrix.to(linear.weight.dtype), persistent=False)
        with torch.no_grad():
            self.weight.copy_(self.fold(linear.weight))
            if linear.bias is not None:
                self.bias.copy_(linear.bias)

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, C*pool_h*pool_w]`` -> ``[out, C*map_h*map_w]``: each channel's columns times ``P``."""
        out = weight.shape[0]
        blocks = weight.reshape(out, self.channels, -1)
        return torch.einsum("ocp,pi->oci", blocks, self._pooling.to(weight.dtype)).reshape(out, -1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] == self.pooled_in_features != self.in_features:
            state_dict[prefix + "weight"] = self.fold(weight)  # an unfolded (older or ImageNet) checkpoint
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MapSizeCheck(nn.Module):
    """Stands where the pooling was: passes the feature map on, refusing a map size the fold was not made for."""

    def __init__(self, map_hw: tuple[int, int], image_size: int) -> None:
        super().__init__()
        self.map_h, self.map_w, self.image_size = int(map_hw[0]), int(map_hw[1]), int(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.map_h or x.shape[-1] != self.map_w:
            raise ValueError(
                "this network's pooling is folded for inputs of the training image size; "
                "resize the input to that size (see image_size in the model's settings)"
            )
        return x

    def extra_repr(self) -> str:
        return f"map={self.map_h}x{self.map_w}, image_size={self.image_size}"


def _first_linear(classifier: nn.Sequential) -> int:
    return next(i for i, layer in enumerate(classifier) if isinstance(layer, nn.Linear))


@torch.no_grad()
def fold_backbone_pooling(
    backbone: nn.Module, image_size: int, replicating_only: bool = True
) -> FoldedPoolLinear | None:
    """Fold ``backbone.avgpool`` into the first Linear of ``backbone.classifier`` (AlexNet, VGG) for square inputs
    of ``image_size`` px; return the folded layer, or None where nothing is folded: another architecture, a
    pooling that is the identity at this size, or (with ``replicating_only``, the default) one that averages,
    where the fold is exact in the forward pass but no optimizer setting trains it as the unfolded layer."""
    pool, classifier = getattr(backbone, "avgpool", None), getattr(backbone, "classifier", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or not isinstance(classifier, nn.Sequential):
        return None
    features = backbone.features
    was_training = features.training
    weight = next(backbone.parameters())
    probe = torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype)
    feature_map = features.eval()(probe)
    features.train(was_training)
    channels, map_hw = feature_map.shape[1], tuple(feature_map.shape[-2:])
    pool_hw = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size, pool.output_size)
    if map_hw == tuple(pool_hw):
        return None
    if replicating_only and replication_count(pooling_matrix(map_hw, pool_hw)) is None:
        return None
    index = _first_linear(classifier)
    folded = FoldedPoolLinear(classifier[index], channels, map_hw, pool_hw)
    classifier[index] = folded
    backbone.avgpool = MapSizeCheck(map_hw, image_size)
    return folded


def parameter_groups(network: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups that train a folded network exactly as the unfolded one.

    Every folded weight with replication ``r`` gets ``lr * r`` and ``weight_decay / r`` (see module doc), marked
    ``fold_replication: r``; all other parameters form the first group with ``lr`` and ``weight_decay``. A network
    without folded layers gives one group, the same as ``network.parameters()``. ``options`` (e.g. momentum)
    go to every group.
    """
    folded = [m for m in network.modules() if isinstance(m, FoldedPoolLinear) and m.replication is not None]
    special = {id(m.weight) for m in folded}
    plain = [p for p in network.parameters() if id(p) not in special]
    groups: list[dict[str, Any]] = [{"params": plain, "lr": lr, "weight_decay": weight_decay, **options}]
    for layer in folded:
        r = layer.replication
        groups.append(
            {"params": [layer.weight], "lr": lr * r, "weight_decay": weight_decay / r, "fold_replication": r, **options}
        )
    return groups


def check_optimizer(network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that would not train a folded network as the unfolded one (see module doc)."""
    folded = [m for m in network.modules() if isinstance(m, FoldedPoolLinear)]
    if not folded:
        return
    scaled = {id(p) for g in optimizer.param_groups if g.get("fold_replication") for p in g["params"]}
    for layer in folded:
        if layer.replication is None:
            raise ValueError(
                f"the pooling before {layer.out_features}-wide layer averages (map {layer.map_hw} -> "
                f"{layer.pool_hw}), so no learning-rate rule trains the folded layer exactly; use fold_pooling: false"
            )
        if id(layer.weight) not in scaled:
            raise ValueError(
                "the network folds its pooling into the first fully connected layer; build the optimizer's params "
                "with scripts.pool_fold.parameter_groups(network, lr, weight_decay) (or set fold_pooling: false)"
            )
    if type(optimizer) is torch.optim.Adam and any(
        g.get("fold_replication") and g["weight_decay"] > 0 for g in optimizer.param_groups
    ):
        raise ValueError(
            "Adam's weight decay is added to the gradient, so a folded layer does not train as the unfolded one; "
            "use AdamW, weight_decay: 0, or fold_pooling: false"
        )
