"""Synergic Deep Learning (SDL^n) network: N independent CNN branches plus one synergic head per branch pair.

Each branch is a torchvision backbone whose 1000-way ImageNet layer is replaced by a hidden fully-connected layer
(the penultimate features f_i) and a ``num_classes`` prediction layer, as in Zhang et al. (MICCAI 2018 / MedIA 2019)
and the glioma SDL paper. A synergic head takes the fused features of two branches and predicts one logit for
"both images show the same class".

Gradient rule: the head learns from the plain synergic BCE gradient, while every branch receives
``dCE_i/dtheta_i + lambda * dBCE/dtheta_i`` through its features. That is obtained by passing the features entering
the heads through :func:`scale_gradient` (identity forward, ``lambda`` x gradient backward). Writing the loss as
``ce_1 + ce_2 + lambda * bce`` instead would also scale the head's own gradient by lambda.

Faces:
    * ``forward(image)``: mean of the branches' softmax probabilities, ``[B, C]`` (evaluation, inference,
      TorchScript export, MONAI Deploy). Works with ``torch.jit.trace`` and ``torch.jit.script``.
    * ``branch_probabilities(image)``: ``[B, N, C]`` for per-branch analysis.
    * ``forward_pairs(images)``: training face, one image batch per branch.
    * :class:`SDLPairForward` ``(net)(*images)``: the training face as a module's ``forward``, for wrappers that
      act in ``__call__`` (``DistributedDataParallel`` synchronises gradients only for calls through its own
      ``forward``); wrap ``SDLPairForward(net)``, not ``net``, with DDP when training.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from scripts.flags import as_flag
from scripts.model_settings import normalised_settings, settings_json
from scripts.pool_fold import fold_backbone_pooling

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "GradientScale",
    "SDLBranch",
    "SDLNet",
    "SDLPairForward",
    "load_state_dict_file",
    "scale_gradient",
]

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "product")


class GradientScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in the backward pass.

    Placed between a branch's features and the synergic heads so the branch receives ``factor`` x the synergic
    gradient while the head (downstream of this op) still sees the unscaled loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = float(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``x`` unchanged, but scale the gradient flowing back through it by ``factor``."""
    return GradientScale.apply(x, factor)


@dataclass(frozen=True)
class _BackboneSpec:
    """How to strip a torchvision model's ImageNet classifier: ``strip`` replaces the 1000-way layer with Identity
    and returns the width of the features that layer consumed."""

    strip: Callable[[nn.Module], int]
    build_kwargs: dict
    pretrained_kwargs: dict  # constructor arguments torchvision uses together with ImageNet weights


def _strip_sequential_last(attr: str) -> Callable[[nn.Module], int]:
    """Classifier is an ``nn.Sequential`` whose last entry is the 1000-way Linear (AlexNet, VGG, EfficientNet)."""

    def strip(model: nn.Module) -> int:
        seq = getattr(model, attr)
        width = seq[-1].in_features
        seq[-1] = nn.Identity()
        return width

    return strip


def _strip_attribute(attr: str) -> Callable[[nn.Module], int]:
    """Classifier is a single Linear attribute (ResNet ``fc``, GoogLeNet ``fc``)."""

    def strip(model: nn.Module) -> int:
        width = getattr(model, attr).in_features
        setattr(model, attr, nn.Identity())
        return width

    return strip


_GOOGLENET = {"aux_logits": False, "init_weights": True}
# The 4096-d FC layers of AlexNet/VGG are kept: only the 1000-way layer is replaced, as in the paper.
BACKBONES: dict[str, _BackboneSpec] = {
    "alexnet": _BackboneSpec(_strip_sequential_last("classifier"), {}, {}),
    "vgg16": _BackboneSpec(_strip_sequential_last("classifier"), {}, {}),
    "vgg19": _BackboneSpec(_strip_sequential_last("classifier"), {}, {}),
    "resnet18": _BackboneSpec(_strip_attribute("fc"), {}, {}),
    "resnet50": _BackboneSpec(_strip_attribute("fc"), {}, {}),
    "resnet101": _BackboneSpec(_strip_attribute("fc"), {}, {}),
    "resnet152": _BackboneSpec(_strip_attribute("fc"), {}, {}),
    "efficientnet_b0": _BackboneSpec(_strip_sequential_last("classifier"), {}, {}),
    "googlenet": _BackboneSpec(_strip_attribute("fc"), _GOOGLENET, {"transform_input": True}),
}


def _cached_weights_file(backbone: str) -> Path | None:
    """Path of torchvision's ImageNet checkpoint for ``backbone`` in the torch hub cache, if already downloaded.

    Never downloads: only checks ``<hub dir>/checkpoints/<file name of the weights URL>`` for the default weights
    first, then any other ImageNet weights of the same architecture.
    """
    weights_enum = torchvision.models.get_model_weights(backbone)
    candidates = [weights_enum.DEFAULT] + [w for w in weights_enum if w != weights_enum.DEFAULT]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in candidates:
        path = checkpoints / Path(weights.url).name
        if path.is_file():
            return path
    return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict saved with ``torch.save``; unwraps ``{"state_dict": ...}`` / ``{"model": ...}``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build_backbone(
    backbone: str,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    random_init: str = "kaiming",
    download_weights: bool = False,
) -> tuple[nn.Module, int]:
    """Build a torchvision ``backbone`` without its 1000-way layer; return ``(module, feature_width)``.

    With ``pretrained=True`` the ImageNet weights come from ``weights_path``, else from the torch hub cache, else
    (only with ``download_weights=True``) from torchvision's standard download into that cache. Without any of
    them it is an error, never a silent start from random weights: a run meant to reproduce the paper's
    ImageNet start must not quietly become another experiment.
    A backbone that starts from random weights (``pretrained=False``) is initialised by ``random_init``:
    ``"kaiming"`` (default, :func:`kaiming_init`) or ``"torchvision"`` (the library's own initialisation).
    """
    if random_init not in RANDOM_INITS:
        raise ValueError(f"Unknown random_init {random_init!r}; choose one of {list(RANDOM_INITS)}.")
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}.")
    spec = BACKBONES[backbone]
    state: dict[str, torch.Tensor] | None = None
    if as_flag(pretrained):  # `--pretrained false` arrives as the string "false"
        state = _imagenet_state(backbone, weights_path, as_flag(download_weights))
    kwargs = dict(spec.build_kwargs)
    if state is not None:
        kwargs.update(spec.pretrained_kwargs)
    model = torchvision.models.get_model(backbone, weights=None, **kwargs)
    if state is not None:
        if backbone == "googlenet":  # auxiliary classifiers are not built
            state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        model.load_state_dict(state)
    elif random_init == "kaiming":
        kaiming_init(model)
    model.sdl_from_scratch = state is None  # read by SDLBranch / SDLNet to choose how the new layers start
    width = spec.strip(model)
    return model, width


def _imagenet_state(backbone: str, weights_path: str | Path | None, download: bool) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of ``backbone``: a given file, torch's hub cache, or (if allowed) the download."""
    if weights_path is not None:
        source = Path(weights_path)
        if not source.is_file():
            raise FileNotFoundError(f"weights_path {source} does not exist.")
    else:
        source = _cached_weights_file(backbone)
    if source is not None:
        logger.info("Loading ImageNet weights for %s from %s.", backbone, source)
        return load_state_dict_file(source)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if not download:
        raise FileNotFoundError(
            f"pretrained is set but no ImageNet weights for {backbone} were found (no --weights_path, and no "
            f"{Path(weights.url).name} in {cache}). Give --weights_path FILE, put the file in that folder, allow "
            f"torchvision's download with --download_weights true, or train from random weights with "
            f"--pretrained false."
        )
    logger.info("Downloading ImageNet weights for %s from %s into %s.", backbone, weights.url, cache)
    return weights.get_state_dict(progress=False, check_hash=True)


RANDOM_INITS = ("kaiming", "torchvision")


def kaiming_init(module: nn.Module) -> None:
    """He et al.'s (2015) normal initialisation, ``fan_in`` mode for ReLU, of every convolution and linear layer.

    A backbone trained from random weights needs it: torchvision builds AlexNet (and GoogLeNet) with
    PyTorch's default ``kaiming_uniform_(a=sqrt(5))``, whose weight variance ``1 / (3 fan_in)`` is a sixth of
    what keeps a ReLU layer's output variance equal to its input's. Through AlexNet's five convolutions and
    two 4096-wide layers the signal shrinks about 500-fold in standard deviation: every image gives nearly
    the same logits (std 0.005 measured at 128 px), the gradients reaching the convolutions are as small,
    and training sits at chance for epochs before it finds a direction. Biases start at zero; normalisation
    layers keep their own initialisation (weight 1, bias 0).
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _init_new_layers(module: nn.Module, bound: float = 0.05) -> None:
    """Zhang et al. initialise the layers SDL adds with U(-0.05, 0.05); biases start at zero."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.zeros_(layer.bias)


def zero_output_layer(module: nn.Module) -> None:
    """Start the last ``Linear`` of ``module`` (a prediction layer or a synergic head) at zero.

    Why, for branches trained from scratch: the features of a randomly initialised AlexNet are mostly common
    to every image (measured on the demo data at 128 px with He initialisation: the logits' spread across
    images is a tenth of their size, so about 90 % of each logit is the same offset for every slice). Through
    Zhang's U(-0.05, 0.05) prediction layer that offset is a large, arbitrary preference for one class: the
    first epoch's cross-entropy is 2.4 rather than ln 3 = 1.1, and the first updates are spent undoing it,
    which sends every slice to one class and back. A zero prediction layer starts at exactly ln 3 with no
    preference; its first gradient, ``(p - y) f^T`` over a class-balanced batch, cancels the common part of
    ``f`` and follows what differs between the grades. (The "zero-init the last layer" of Goyal et al. 2017.)
    Pretrained branches keep Zhang's initialisation, so ``paper.yaml`` is unchanged.
    """
    last = [layer for layer in module.modules() if isinstance(layer, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class SDLBranch(nn.Module):
    """One DCNN component: backbone -> hidden FC (ReLU) = features f -> dropout -> class logits.

    The synergic heads read ``f`` before dropout, so dropout only regularises the classification layer.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        hidden_size: int,
        dropout: float,
        pretrained: bool,
        weights_path: str | Path | None,
        random_init: str = "kaiming",
        fold_pooling: bool = False,
        image_size: int = 128,
        download_weights: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, width = build_backbone(backbone, pretrained, weights_path, random_init, download_weights)
        if as_flag(fold_pooling):  # after any ImageNet weights are loaded, so they are folded too
            fold_backbone_pooling(self.backbone, int(image_size))
        self.hidden = nn.Sequential(nn.Linear(width, hidden_size), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))
        _init_new_layers(self.hidden)
        _init_new_layers(self.classifier)
        self.from_scratch = bool(self.backbone.sdl_from_scratch) and random_init == "kaiming"
        if self.from_scratch:
            zero_output_layer(self.classifier)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits [B, C], features [B, hidden])``."""
        features = self.hidden(torch.flatten(self.backbone(x), 1))
        return self.classifier(features), features


def _synergic_head(in_features: int, hidden: int) -> nn.Module:
    """Linear -> ReLU -> Linear(1); ``hidden=0`` gives the paper's single sigmoid neuron (one Linear)."""
    if hidden <= 0:
        head: nn.Module = nn.Linear(in_features, 1)
    else:
        head = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
    _init_new_layers(head)
    return head


# the settings that shape the network (the others shape its input)
_ARCHITECTURE_SETTINGS = (
    "backbone",
    "num_branches",
    "hidden_size",
    "fusion",
    "fold_pooling",
    "image_size",
    "pretrained",
)


class SDLNet(nn.Module):
    """SDL^n classifier: ``num_branches`` independent branches and C(n, 2) synergic heads.

    Args:
        backbone: torchvision architecture of every branch, one of :data:`BACKBONES`.
        num_classes: number of classes (3 glioma grades).
        num_branches: number of branches N (the paper uses 2). ``1`` builds the single-network baseline the paper
            compares SDL with: one branch, no synergic head, ``forward`` = that branch's softmax; the branch is
            built exactly as an SDL branch, so a comparison isolates what the synergic pairing adds.
        hidden_size: width of the hidden FC layer whose output are the synergic features (Zhang uses 1024).
        fusion: ``"concat"`` (paper text, Zhang) or ``"product"`` (f_i * f_j, the paper's algorithm box).
        synergic_lambda: lambda; scales the synergic gradient each branch receives through its features.
        pretrained: start the backbones from ImageNet weights: ``weights_path``, else torch's hub cache, else
            torchvision's download when ``download_weights`` is set; without any of them an error.
        weights_path: local torchvision state_dict for the backbone, used when ``pretrained`` is True.
        download_weights: let torchvision download the ImageNet weights into torch's hub cache if needed.
        dropout: dropout before each branch's prediction layer.
        synergic_hidden: hidden width of each synergic head MLP; 0 means a single Linear(1).
        random_init: how a backbone without ImageNet weights starts: ``"kaiming"`` (He initialisation, default;
            see :func:`kaiming_init` for why) or ``"torchvision"`` (as the library builds it).
        fold_pooling: fold a pooling that only replicates the last feature map (AlexNet's 6x6 pooling of the
            3x3 map of a 128 px input) into the first fully connected layer (:mod:`scripts.pool_fold`): the same
            function with a quarter of that layer's weights; the network then takes ``image_size`` px inputs only.
        image_size: the (square) input size the fold is made for.
        settings: the settings the model was trained with (:mod:`scripts.model_settings`); kept as the JSON text
            attribute ``model_settings`` ("" without), which a TorchScript archive keeps, so an exported model
            carries what its input must be.

    ``googlenet`` branches can be traced but not scripted (torchvision's scripted GoogLeNet returns a namedtuple).
    """

    def __init__(
        self,
        backbone: str = "alexnet",
        num_classes: int = 3,
        num_branches: int = 2,
        hidden_size: int = 1024,
        fusion: str = "concat",
        synergic_lambda: float = 3.0,
        pretrained: bool = False,
        weights_path: str | Path | None = None,
        dropout: float = 0.5,
        synergic_hidden: int = 512,
        random_init: str = "kaiming",
        fold_pooling: bool = False,
        image_size: int = 128,
        download_weights: bool = False,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_settings = settings_json(settings) if settings else ""
        if backbone not in BACKBONES:
            raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}.")
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1 (1: a single-network baseline, no head), got {num_branches}.")
        self.num_classes = num_classes
        self.num_branches = num_branches
        self.fusion = fusion
        self.synergic_lambda = float(synergic_lambda)
        self.branches = nn.ModuleList(
            SDLBranch(
                backbone,
                num_classes,
                hidden_size,
                dropout,
                pretrained,
                weights_path,
                random_init,
                fold_pooling,
                image_size,
                download_weights,
            )
            for _ in range(num_branches)
        )
        self.head_pairs = list(  # [(i, j)], one synergic head per branch pair
            itertools.combinations(range(num_branches), 2)
        )
        head_in = 2 * hidden_size if fusion == "concat" else hidden_size
        self.heads = nn.ModuleList(_synergic_head(head_in, synergic_hidden) for _ in self.head_pairs)
        if all(branch.from_scratch for branch in self.branches):
            for head in self.heads:  # the synergic logit starts at 0 (p = 0.5) for the same reason
                zero_output_layer(head)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **options: Any) -> SDLNet:
        """The network a model's settings describe (:data:`scripts.model_settings.SETTING_KEYS`; the classes are
        the label map's), carrying them as ``model_settings``: the one way training, evaluation, inference and
        export build it, so none repeats the settings one by one.

        ``options`` are the constructor's other arguments (``synergic_lambda``, where ImageNet weights come
        from) and override a setting of the same name, as evaluation's ``pretrained=False`` does: its weights
        come from ``model.pt``. Values arriving as command-line text (``"false"``, ``"64"``) are read once here.
        """
        values = normalised_settings(settings)
        architecture = {key: values[key] for key in _ARCHITECTURE_SETTINGS}
        return cls(num_classes=len(values["label_map"]), settings=values, **{**architecture, **options})

    def branch_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of every branch for the same images: ``[B, N, C]``."""
        probs: list[torch.Tensor] = []
        for branch in self.branches:
            logits, _ = branch(image)
            probs.append(torch.softmax(logits, dim=1))
        return torch.stack(probs, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Classifier face: mean of the branches' probabilities, ``[B, C]`` (argmax equals Zhang's summed rule)."""
        return self.branch_probabilities(image).mean(dim=1)

    def fuse(self, f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
        """Combine two branches' features into a synergic head input."""
        return torch.cat([f_i, f_j], dim=1) if self.fusion == "concat" else f_i * f_j

    def forward_pairs(self, images: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Training face: branch i classifies ``images[i]``; every head judges whether its pair shares a class.

        Returns ``{"logits": N x [B, C], "features": N x [B, hidden], "synergic_logits": heads x [B]}``, heads in
        :attr:`head_pairs` order. Features enter the heads through ``scale_gradient(f, synergic_lambda)``.
        """
        if len(images) != self.num_branches:
            raise ValueError(f"Expected {self.num_branches} image batches (one per branch), got {len(images)}.")
        logits, features = [], []
        for branch, image in zip(self.branches, images, strict=True):
            out, feat = branch(image)
            logits.append(out)
            features.append(feat)
        scaled = [scale_gradient(f, self.synergic_lambda) for f in features]
        synergic = [
            head(self.fuse(scaled[i], scaled[j])).squeeze(1)
            for head, (i, j) in zip(self.heads, self.head_pairs, strict=True)
        ]
        return {"logits": logits, "features": features, "synergic_logits": synergic}


class SDLPairForward(nn.Module):
    """The training face of an :class:`SDLNet` as ``forward``: ``SDLPairForward(net)(*images)`` is
    ``net.forward_pairs(images)``.

    ``DistributedDataParallel`` prepares gradient synchronisation in its ``forward``; calling
    ``ddp.module.forward_pairs`` bypasses it and the ranks' weights drift apart. Wrap this module instead,
    ``DistributedDataParallel(SDLPairForward(net))``, and call it with one image batch per branch. It owns no
    parameters of its own and shares ``net``'s, so checkpoints, the optimizer and the evaluator keep using ``net``
    (state_dict keys unchanged) and ``net.forward`` stays the scriptable classifier face.
    """

    def __init__(self, net: SDLNet) -> None:
        super().__init__()
        self.net = net

    @property
    def head_pairs(self) -> list[tuple[int, int]]:
        return self.net.head_pairs

    def forward(self, *images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return self.net.forward_pairs(images)
