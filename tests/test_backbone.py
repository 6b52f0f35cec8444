"""The backbone factory: the shipped ImageNet weights classify real photographs through the project's own
crop and normalisation, every backbone gives (pooled, spatial) maps at stride 32, normalises its own
input, and the paper's ResNet-50 reads its ImageNet file from the user's torch cache only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from vqhps.config import VQHPSConfig
from vqhps.data.sample import crop_and_resize, square_bbox
from vqhps.hps_training import Schedule, is_backbone_parameter, lr_factor, parameter_groups
from vqhps.models import backbone as B
from vqhps.models.vqhps import VQHPS


def photo_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """A photograph as a model sees it here: the central square crop through ``crop_and_resize``, in [0, 1]."""
    h, w = image.shape[:2]
    box = square_bbox(np.array([[0.0, 0.0], [w - 1.0, h - 1.0]]), scale=min(h, w) / max(h, w))
    crop, _ = crop_and_resize(image, box, size)
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize("name", ["efficientnet_lite2", "efficientnet_lite0"])
def test_shipped_imagenet_weights_classify_photographs(name):
    classifier = B.imagenet_classifier(name).eval()
    with torch.no_grad():
        cat = classifier(photo_input(skdata.chelsea())).argmax(-1).item()
        coffee = classifier(photo_input(skdata.coffee())).argmax(-1).item()
    assert 281 <= cat <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)
    assert coffee == 967  # espresso


def test_random_weights_do_not_classify():
    """The check above can fail: the same network with random weights misses both classes."""
    torch.manual_seed(0)
    net = B.build_backbone("efficientnet_lite2", None).eval()
    fc = torch.nn.Linear(net.out_dim, 1000)
    with torch.no_grad():
        cat = fc(net(photo_input(skdata.chelsea()))[0]).argmax(-1).item()
        coffee = fc(net(photo_input(skdata.coffee()))[0]).argmax(-1).item()
    assert not (281 <= cat <= 285 and coffee == 967)


@pytest.mark.parametrize("name", sorted(B.SPECS))
def test_every_backbone_gives_pooled_and_stride_32_maps_in_either_memory_format(name):
    torch.manual_seed(0)
    net = B.build_backbone(name, None).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled, spatial = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        pooled_cl, _ = net_cl(x.contiguous(memory_format=torch.channels_last))
    c = B.SPECS[name].out_dim
    assert pooled.shape == (2, c) and spatial.shape == (2, c, 2, 2) and net.out_dim == c
    assert torch.allclose(pooled, spatial.mean(dim=(2, 3)))
    assert torch.allclose(pooled, pooled_cl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, mean, std", [("efficientnet_lite2", 0.5, 0.5),
                                             ("resnet50", B.IMAGENET_MEAN, B.IMAGENET_STD)])
def test_a_backbone_normalises_its_input_with_its_weights_statistics(name, mean, std):
    net = B.build_backbone(name, None).eval()
    x = torch.rand(1, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose(net.normalise(x), expected.expand_as(x), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(net(x)[1], net.features(expected.expand_as(x).contiguous()), atol=1e-5)


def test_unknown_backbone_or_weights_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'vit'.*efficientnet_lite2"):
        B.build_backbone("vit")
    with pytest.raises(ValueError, match="'imagenet' or None"):
        B.build_backbone("resnet50", "imagenet22k")


def test_missing_resnet50_imagenet_file_names_its_exact_path(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert B.imagenet_checkpoint_path() == expected
    with pytest.raises(FileNotFoundError, match=str(expected)):
        B.build_backbone("resnet50", "imagenet")
    cfg = VQHPSConfig(d_model=32, n_heads=2, mlp_hidden=64, backbone="resnet50", backbone_weights="imagenet")
    with pytest.raises(FileNotFoundError, match="copy"):
        VQHPS(cfg, torch.zeros(17, 3))


def test_resnet50_imagenet_file_in_the_torch_cache_is_loaded(monkeypatch, tmp_path):
    """The paper's backbone, with a random-valued file where the user's ImageNet file goes."""
    from torchvision.models import resnet50

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = B.imagenet_checkpoint_path()
    path.parent.mkdir(parents=True)
    torch.manual_seed(5)
    state = resnet50(weights=None).state_dict()
    torch.save(state, path)
    net = B.build_backbone("resnet50", "imagenet")
    assert torch.equal(net.features.stem[0].weight, state["conv1.weight"])
    assert torch.equal(net.features.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_vqhps_takes_the_configured_backbone_and_its_width():
    cfg = VQHPSConfig(d_model=32, n_heads=2, mlp_hidden=64, backbone="efficientnet_lite0", backbone_weights=None)
    model = VQHPS(cfg, torch.zeros(17, 3))
    assert model.rot_backbone.name == model.mesh_backbone.name == "efficientnet_lite0"
    assert model.mesh.input_proj.in_channels == 1280
    assert model.rot_head.mlp[1].in_features == 1280 + 17 * 3


def test_backbone_parameters_get_their_own_learning_rate_and_the_schedule_warms_up():
    cfg = VQHPSConfig(d_model=32, n_heads=2, mlp_hidden=64, backbone="efficientnet_lite0", backbone_weights=None)
    model = VQHPS(cfg, torch.zeros(17, 3))
    names = [n for n, _ in model.named_parameters()]
    assert is_backbone_parameter("rot_backbone.features.net._conv_stem.weight")
    assert is_backbone_parameter("module.backbone.features.stem.0.weight")
    assert not is_backbone_parameter("rot_head.out.weight") and not is_backbone_parameter("backbone_scale")
    schedule = Schedule(epochs=2, batch_size=8, lr=1e-3, weight_decay=0.0, lr_step_epochs=1, lr_gamma=0.1,
                        backbone_lr_scale=0.25, warmup_steps=4)
    heads, backbones = parameter_groups(model.named_parameters(), schedule)
    n_backbone = sum(is_backbone_parameter(n) for n in names)
    assert len(backbones["params"]) == n_backbone and len(heads["params"]) == len(names) - n_backbone
    assert heads["lr"] == 1e-3 and backbones["lr"] == pytest.approx(2.5e-4)
    # warm-up 1/4, 2/4, ... then one decade per epoch of 10 steps
    assert [lr_factor(s, schedule, 10) for s in (0, 1, 3, 9, 10, 25)] == pytest.approx([0.25, 0.5, 1, 1, 0.1, 0.01])
