"""Tests for the SDL network: faces and shapes, backbones, weight loading, TorchScript, and the gradient rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from scripts.network import BACKBONES, SDLNet, scale_gradient
from torch import nn

SIZE = 64  # AlexNet/VGG/ResNet have adaptive pooling: any size from 64 up works


def _images(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _small_net(**kwargs) -> SDLNet:
    torch.manual_seed(0)
    kwargs.setdefault("hidden_size", 32)
    kwargs.setdefault("synergic_hidden", 16)
    return SDLNet(**kwargs)


def test_scale_gradient_identity_forward_scaled_backward():
    x = torch.randn(4, 5, requires_grad=True)
    y = scale_gradient(x, 3.0)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("num_branches", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "product"])
def test_shapes_of_every_face(num_branches, fusion):
    net = _small_net(num_branches=num_branches, fusion=fusion).eval()
    expected_pairs = [(0, 1)] if num_branches == 2 else [(0, 1), (0, 2), (1, 2)]
    assert net.head_pairs == expected_pairs
    assert len(net.heads) == len(expected_pairs)
    images = [_images(seed=i) for i in range(num_branches)]
    out = net.forward_pairs(images)
    assert [t.shape for t in out["logits"]] == [torch.Size([2, 3])] * num_branches
    assert [t.shape for t in out["features"]] == [torch.Size([2, 32])] * num_branches
    assert [t.shape for t in out["synergic_logits"]] == [torch.Size([2])] * len(expected_pairs)
    assert net.branch_probabilities(images[0]).shape == (2, num_branches, 3)
    assert net(images[0]).shape == (2, 3)


def test_forward_is_mean_of_branch_probabilities():
    net = _small_net().eval()
    x = _images(batch=3)
    with torch.no_grad():
        probs = net(x)
        branch = net.branch_probabilities(x)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(probs, branch.mean(dim=1), atol=1e-7)
    assert torch.allclose(branch.sum(dim=2), torch.ones(3, 2), atol=1e-6)


def test_branches_share_no_weights():
    net = _small_net()
    a, b = net.branches
    assert a.backbone.features[0].weight.data_ptr() != b.backbone.features[0].weight.data_ptr()
    assert not torch.equal(a.backbone.features[0].weight, b.backbone.features[0].weight)


def test_new_layers_use_zhang_uniform_init():
    net = _small_net(random_init="torchvision")
    for layer in [net.branches[0].hidden[0], net.branches[0].classifier[1], net.heads[0][0], net.heads[0][2]]:
        assert layer.weight.abs().max() <= 0.05 and layer.weight.abs().max() > 0.04
        assert torch.count_nonzero(layer.bias) == 0


def test_from_scratch_branches_start_without_a_class_preference():
    """He-initialised backbones, zero prediction layers and zero synergic outputs: every slice starts at
    p = 1/3 for each grade (loss ln 3) and p = 0.5 for "same grade", while the features already differ."""
    net = _small_net().eval()
    images = _images(batch=4)
    torch.testing.assert_close(net(images), torch.full((4, 3), 1 / 3))
    out = net.forward_pairs([images, _images(batch=4, seed=1)])
    torch.testing.assert_close(out["synergic_logits"][0], torch.zeros(4))
    features = out["features"][0]
    assert float(features.std(dim=0).mean()) > 0.01  # the hidden features depend on the image
    conv = net.branches[0].backbone.features[0]  # He normal, fan_in: std sqrt(2 / fan_in)
    fan_in = conv.weight[0].numel()
    assert abs(float(conv.weight.std()) - (2 / fan_in) ** 0.5) < 0.1 * (2 / fan_in) ** 0.5
    assert net.branches[0].hidden[0].weight.abs().max() <= 0.05  # the hidden layer keeps Zhang's init


def test_zero_output_layer_still_learns():
    """A zero prediction layer gets a gradient at once, so the first step moves the logits."""
    net = _small_net(dropout=0.0)
    images, labels = _images(batch=6), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = nn.functional.cross_entropy(net.branches[0](images)[0], labels)
    loss.backward()
    assert float(net.branches[0].classifier[1].weight.grad.abs().sum()) > 0


def test_single_neuron_head():
    net = _small_net(synergic_hidden=0)
    assert isinstance(net.heads[0], nn.Linear) and net.heads[0].in_features == 64


def test_invalid_options_list_choices():
    with pytest.raises(ValueError, match="alexnet"):
        SDLNet(backbone="lenet")
    with pytest.raises(ValueError, match="concat"):
        SDLNet(fusion="sum")
    with pytest.raises(ValueError, match="branches"):
        SDLNet(num_branches=0)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_builds_and_runs(backbone):
    net = _small_net(backbone=backbone).eval()
    x = _images(size=SIZE)
    with torch.no_grad():
        out = net.forward_pairs([x, x])
        probs = net(x)
    assert out["logits"][0].shape == (2, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)


def test_pretrained_without_weights_is_an_error_not_a_random_start(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", _refuse_download)
    with pytest.raises(FileNotFoundError, match="--download_weights true") as error:
        _small_net(pretrained=True)
    assert "alexnet-owt-7be5be79.pth" in str(error.value) and str(tmp_path) in str(error.value)


def _refuse_download(*args, **kwargs):
    raise AssertionError("tests never download")


def test_download_is_torchvisions_and_only_when_allowed(monkeypatch, tmp_path):
    """``download_weights`` hands over to torchvision's own download (replaced here: tests never download)."""
    state = _reference_alexnet_state(seed=3)
    asked = []
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(
        torchvision.models.WeightsEnum, "get_state_dict", lambda self, **kw: asked.append(self.url) or state
    )
    net = _small_net(pretrained=True, download_weights=True)
    assert asked == [torchvision.models.AlexNet_Weights.DEFAULT.url] * 2  # once per branch
    assert torch.equal(net.branches[0].backbone.features[0].weight, state["features.0.weight"])


def _reference_alexnet_state(seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None).state_dict()


def test_pretrained_from_weights_path(tmp_path):
    state = _reference_alexnet_state()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    net = _small_net(pretrained=True, weights_path=path)
    for branch in net.branches:
        assert torch.equal(branch.backbone.features[0].weight, state["features.0.weight"])
        assert torch.equal(branch.backbone.classifier[4].weight, state["classifier.4.weight"])


def test_pretrained_from_hub_cache_only(monkeypatch, tmp_path):
    state = _reference_alexnet_state(seed=7)
    url_name = Path(torchvision.models.AlexNet_Weights.DEFAULT.url).name
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / url_name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", _refuse_download)
    net = _small_net(pretrained=True)
    assert torch.equal(net.branches[1].backbone.features[3].weight, state["features.3.weight"])


def test_missing_weights_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        _small_net(pretrained=True, weights_path=tmp_path / "nope.pth")


def test_jit_trace_matches_eager_at_other_size():
    net = _small_net().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, _images(size=SIZE))
        x = _images(batch=3, size=96, seed=5)
        assert torch.allclose(traced(x), net(x), atol=1e-6)


def test_jit_script_matches_eager():
    net = _small_net().eval()
    scripted = torch.jit.script(net)
    x = _images(size=80)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-6)


# ---- the synergic gradient rule -------------------------------------------------------------------------------


def _rule_setup():
    """A deterministic double-precision net (eval: no dropout, frozen BN statistics) and one pair batch."""
    # Zhang's initialisation throughout: a zero-initialised head (the from-scratch default) passes no synergic
    # gradient to the branches at the first step, and the rule is about that gradient
    net = _small_net(backbone="resnet18", dropout=0.0, random_init="torchvision").double().eval()
    xa, xb = _images(seed=1).double(), _images(seed=2).double()
    ya, yb = torch.tensor([0, 1]), torch.tensor([0, 2])
    target = (ya == yb).double()
    return net, (xa, xb), (ya, yb), target


def _losses(net: SDLNet, images, labels, target, lam: float):
    net.synergic_lambda = lam
    out = net.forward_pairs(list(images))
    ce = [nn.functional.cross_entropy(logit, y) for logit, y in zip(out["logits"], labels, strict=True)]
    bce = nn.functional.binary_cross_entropy_with_logits(out["synergic_logits"][0], target)
    return ce, bce


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _allclose(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip(a, b, strict=True))


def test_gradient_rule_head_unscaled_branches_scaled_by_lambda():
    net, images, labels, target = _rule_setup()
    head = list(net.heads[0].parameters())
    branches = [list(b.parameters()) for b in net.branches]

    ce1, bce1 = _losses(net, images, labels, target, lam=1.0)
    head_ref = _grads(bce1, head)
    syn_ref = [_grads(bce1, p) for p in branches]  # synergic gradient through the features, lambda = 1
    ce_ref = [_grads(ce1[i], branches[i]) for i in range(2)]
    # the synergic loss reaches the backbone and hidden layer, not the prediction layer
    assert syn_ref[0][0].abs().sum() > 0 and syn_ref[1][0].abs().sum() > 0
    assert syn_ref[0][-1].abs().sum() == 0

    for lam in (0.0, 1.0, 3.0):
        ce, bce = _losses(net, images, labels, target, lam)
        # the head learns from the unscaled BCE whatever lambda is
        assert _allclose(_grads(bce, head), head_ref)
        total = ce[0] + ce[1] + bce
        for i in range(2):
            expected = [c + lam * s for c, s in zip(ce_ref[i], syn_ref[i], strict=True)]
            assert _allclose(_grads(total, branches[i]), expected)
        assert _allclose(_grads(total, head), head_ref)


def test_naive_lambda_times_bce_would_scale_the_head_gradient():
    net, images, labels, target = _rule_setup()
    head = list(net.heads[0].parameters())
    ce, bce = _losses(net, images, labels, target, lam=1.0)
    naive = _grads(ce[0] + ce[1] + 3.0 * bce, head)
    rule_ce, rule_bce = _losses(net, images, labels, target, lam=3.0)
    rule = _grads(rule_ce[0] + rule_ce[1] + rule_bce, head)
    assert not _allclose(naive, rule)
    assert _allclose(naive, [3.0 * g for g in rule])


def test_three_branches_each_get_lambda_times_sum_of_their_heads():
    net = _small_net(backbone="resnet18", num_branches=3, dropout=0.0, random_init="torchvision").double().eval()
    images = [_images(seed=i).double() for i in range(3)]
    labels = [torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([1, 1])]

    def syn_total(lam: float) -> torch.Tensor:
        net.synergic_lambda = lam
        out = net.forward_pairs(images)
        return sum(
            nn.functional.binary_cross_entropy_with_logits(logit, (labels[i] == labels[j]).double())
            for logit, (i, j) in zip(out["synergic_logits"], net.head_pairs, strict=True)
        )

    params = list(net.branches[2].parameters())
    ref = _grads(syn_total(1.0), params)
    assert _allclose(_grads(syn_total(3.0), params), [3.0 * g for g in ref])
