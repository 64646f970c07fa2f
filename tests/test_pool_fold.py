"""Folding AlexNet's replicating 6x6 pooling into its first fully connected layer: the same model, step for step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scripts.network import SDLNet
from scripts.pool_fold import (
    FoldedPoolLinear,
    MapSizeCheck,
    check_optimizer,
    fold_backbone_pooling,
    parameter_groups,
    pooling_matrix,
    replication_count,
)
from torch import nn


def _net(dtype: torch.dtype = torch.float64, **kwargs) -> SDLNet:
    torch.manual_seed(0)
    kwargs.setdefault("hidden_size", 32)
    kwargs.setdefault("synergic_hidden", 16)
    kwargs.setdefault("random_init", "torchvision")
    return SDLNet(**kwargs).to(dtype)


def _folded_copy(net: SDLNet, size: int, **kwargs) -> SDLNet:
    folded = copy.deepcopy(net)
    for branch in folded.branches:
        fold_backbone_pooling(branch.backbone, size, **kwargs)
    return folded


def _no_dropout(net: nn.Module) -> nn.Module:
    for layer in net.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    return net


@pytest.mark.parametrize(
    ("in_hw", "expected"),
    [((3, 3), 4), ((1, 1), 36), ((2, 2), 9), ((6, 6), 1), ((4, 4), None), ((5, 5), None)],
)
def test_replication_count_of_the_6x6_pooling(in_hw, expected):
    matrix = pooling_matrix(in_hw, (6, 6))
    assert matrix.shape == (36, in_hw[0] * in_hw[1])
    assert torch.allclose(matrix.sum(1), torch.ones(36, dtype=matrix.dtype))  # each output is an average
    assert replication_count(matrix) == expected


@pytest.mark.parametrize(("size", "map_hw", "replication"), [(64, (1, 1), 36), (128, (3, 3), 4), (160, (4, 4), None)])
def test_forward_matches_at_every_size_including_averaging_pools(size, map_hw, replication):
    net = _net().eval()
    folded = _folded_copy(net, size, replicating_only=False).eval()
    layer = folded.branches[0].backbone.classifier[1]
    assert isinstance(layer, FoldedPoolLinear)
    assert (layer.map_hw, layer.replication) == (map_hw, replication)
    assert layer.in_features == 256 * map_hw[0] * map_hw[1]
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-12, rtol=0)
        assert torch.allclose(folded.branch_probabilities(x), net.branch_probabilities(x), atol=1e-12, rtol=0)


def test_nothing_to_fold_at_224_px_or_for_resnet_and_averaging_pools_are_left_alone_by_default():
    alexnet = _net()
    assert fold_backbone_pooling(copy.deepcopy(alexnet.branches[0].backbone), 224) is None  # 6x6 map: identity
    assert fold_backbone_pooling(copy.deepcopy(alexnet.branches[0].backbone), 160) is None  # 4x4 map: averages
    assert fold_backbone_pooling(_net(backbone="resnet18").branches[0].backbone, 128) is None


def test_folded_network_refuses_other_input_sizes():
    net = _net(fold_pooling=True, image_size=128).eval()
    assert isinstance(net.branches[0].backbone.avgpool, MapSizeCheck)
    with pytest.raises(ValueError, match="folded for inputs of the training image size"):
        net(torch.randn(1, 3, 160, 160, dtype=torch.float64))


def test_fold_keeps_three_quarters_of_the_first_layer_out():
    plain = sum(p.numel() for p in _net(hidden_size=1024, synergic_hidden=512).parameters())
    folded = sum(p.numel() for p in _net(hidden_size=1024, synergic_hidden=512, fold_pooling=True).parameters())
    assert plain - folded == 2 * 4096 * 256 * (36 - 9)  # two branches, 9216 -> 2304 inputs


def _step_both(unfolded: SDLNet, folded: SDLNet, make_optimizer, steps: int = 3) -> None:
    opt_a, opt_b = make_optimizer(unfolded, plain=True), make_optimizer(folded, plain=False)
    check_optimizer(folded, opt_b)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = [torch.randn(4, 3, 128, 128, dtype=torch.float64, generator=generator) for _ in range(2)]
        labels = [torch.randint(0, 3, (4,), generator=generator) for _ in range(2)]
        for net, opt in ((unfolded, opt_a), (folded, opt_b)):
            out = net.forward_pairs(images)
            loss = sum(F.cross_entropy(o, y) for o, y in zip(out["logits"], labels, strict=True))
            target = (labels[0] == labels[1]).double()
            loss = loss + F.binary_cross_entropy_with_logits(out["synergic_logits"][0], target)
            opt.zero_grad()
            loss.backward()
            opt.step()


OPTIMIZERS = {
    "sgd_momentum_weight_decay": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-3}),
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"weight_decay": 0.0}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 1e-2}),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_steps_of_folded_and_unfolded_models_agree(name):
    """Dropout off (it falls on the replicated copies in one model and on the distinct values in the other)."""
    cls, kwargs = OPTIMIZERS[name]
    lr = 1e-3

    def make(net, plain):
        options = {k: v for k, v in kwargs.items() if k != "weight_decay"}
        params = net.parameters() if plain else parameter_groups(net, lr, kwargs["weight_decay"])
        return cls(params, lr=lr, weight_decay=kwargs["weight_decay"], **options)

    unfolded = _no_dropout(_net(hidden_size=64))
    folded = _no_dropout(_folded_copy(unfolded, 128))
    _step_both(unfolded, folded, make)
    for branch_a, branch_b in zip(unfolded.branches, folded.branches, strict=True):
        layer = branch_b.backbone.classifier[1]
        assert torch.allclose(layer.fold(branch_a.backbone.classifier[1].weight), layer.weight, atol=1e-6, rtol=0)
        assert torch.allclose(branch_a.backbone.features[0].weight, branch_b.backbone.features[0].weight, atol=1e-6)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(unfolded.eval()(x), folded.eval()(x), atol=1e-6, rtol=0)


def test_the_plain_learning_rate_would_not_be_exact_and_is_refused():
    folded = _folded_copy(_net(), 128)
    with pytest.raises(ValueError, match="parameter_groups"):
        check_optimizer(folded, torch.optim.SGD(folded.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="AdamW"):
        check_optimizer(folded, torch.optim.Adam(parameter_groups(folded, 1e-3, 1e-4), lr=1e-3))
    groups = parameter_groups(folded, 0.01, 1e-3, momentum=0.9)
    assert [g.get("fold_replication") for g in groups] == [None, 4, 4]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.04, 0.04])
    assert [g["weight_decay"] for g in groups] == pytest.approx([1e-3, 2.5e-4, 2.5e-4])
    assert all(g["momentum"] == 0.9 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(folded.parameters()))
    plain = _net()
    assert len(parameter_groups(plain, 0.01)) == 1


def test_unfolded_state_dict_is_folded_on_load():
    """An older model.pt (or ImageNet weights) holds the 9216-wide layer; a folded network folds it on load."""
    unfolded = _net().eval()
    folded = _net(fold_pooling=True, image_size=128).eval()
    folded.load_state_dict(unfolded.state_dict())
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), unfolded(x), atol=1e-12, rtol=0)
    keys = set(folded.state_dict())
    assert keys == set(unfolded.state_dict())  # torchvision's key names are kept
    assert folded.state_dict()["branches.0.backbone.classifier.1.weight"].shape == (4096, 2304)
