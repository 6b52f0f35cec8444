"""ResNet-50 feature extractor giving both the pooled vector (rotation/camera branch) and the last
spatial feature map (mesh branch). ImageNet weights are read only from the local torch hub cache,
never downloaded."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

FEATURE_DIM = 2048


def imagenet_checkpoint_path() -> Path:
    """Where torchvision's ResNet50_Weights.IMAGENET1K_V1 file must be: ``<torch hub dir>/checkpoints/<url file name>``."""
    name = os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet ResNet-50 state dict from the local cache; FileNotFoundError (with the exact path
    and how to put the file there) when absent."""
    path = imagenet_checkpoint_path()
    if not path.is_file():
        url = ResNet50_Weights.IMAGENET1K_V1.url
        raise FileNotFoundError(
            f"ImageNet ResNet-50 weights not found at {path}. This project never downloads them: fetch "
            f"{url} on a machine with internet access and copy the file to exactly that path (the "
            f"directory follows torch.hub.get_dir(), i.e. $TORCH_HOME/hub; set TORCH_HOME to use another "
            f"cache), or use backbone_weights=None to train from scratch."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNet50Features(nn.Module):
    """ResNet-50 without its classifier: ``forward(x) -> (pooled (B, 2048), spatial (B, 2048, h, w))``
    with h, w = H/32, W/32 (7 x 7 for 224 x 224 crops)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_dim = FEATURE_DIM

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = x.mean(dim=(2, 3))
        return pooled, x


def resnet50_backbone(weights: Literal["imagenet"] | None = None) -> ResNet50Features:
    """A ResNet-50 feature extractor: ``weights=None`` random init (from scratch, the default);
    ``"imagenet"`` torchvision's IMAGENET1K_V1 weights from the local torch hub cache only.
    Works with ``.to(memory_format=torch.channels_last)``."""
    net = resnet50(weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state_dict())
    elif weights is not None:
        raise ValueError(f"weights must be None or 'imagenet', got {weights!r}")
    return ResNet50Features(net)
