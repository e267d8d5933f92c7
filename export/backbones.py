"""Backbones by name: `build_backbone(name, in_channels=..., pretrained=...) -> (module, out_dim)`.

- `cnn`: a small VGG-style network for 28x28 / 32x32 images, trained from scratch (the default for MNIST-type data).
- `resnet18`, `mobilenet_v3_small`, `mobilenet_v3_large`: written here with torchvision's module names, so an
  ImageNet state dict saved by torchvision (`torch.save(model.state_dict(), path)`) loads from a local file.
  Nothing is ever downloaded.

Each backbone ends in global pooling and returns a flat (N, out_dim) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from latenthash.errors import DataError, InvalidInput


def _conv_bn(cin: int, cout: int, *, stride: int = 1, groups: int = 1, kernel: int = 3,
             act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """conv(w) -> pool -> conv(2w) -> pool -> conv(4w) -> conv(4w) -> pool -> flatten. Chosen by measurement on a
    2-core CPU: one conv at full resolution keeps an epoch of Fashion-MNIST near a minute (a VGG pair of full-size
    convs costs 2x the time for no accuracy gain within a 15-minute budget)."""

    def __init__(self, in_channels: int = 1, width: int = 32, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.out_dim = 4 * w * (image_size[0] // 8) * (image_size[1] // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout without `fc`. `small_input` swaps the 7x7/2 stem and max-pool for a 3x3/1
    stem, the usual change for 32x32 images (the stem's pretrained weights are then not loaded)."""

    def __init__(self, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, 1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# ------------------------------------------------------------------------------------------------------ MobileNetV3
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, act: str, stride: int):
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn(cin, expanded, kernel=1, act=activation))
        layers.append(_conv_bn(expanded, expanded, kernel=kernel, stride=stride, groups=expanded, act=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(_conv_bn(expanded, cout, kernel=1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (input, kernel, expanded, output, SE, activation, stride) as in the MobileNetV3 paper and torchvision
_MNV3 = {
    "small": [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
              (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
              (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
              (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)],
    "large": [(16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
              (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
              (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
              (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
              (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1)],
}


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 `features` without the classifier; Jetson-friendly."""

    def __init__(self, variant: str = "small", in_channels: int = 3):
        super().__init__()
        settings = _MNV3[variant]
        layers: list[nn.Module] = [_conv_bn(in_channels, 16, stride=2, act=nn.Hardswish)]
        layers += [InvertedResidual(*s) for s in settings]
        last = settings[-1][3]
        layers.append(_conv_bn(last, 6 * last, kernel=1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 6 * last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


# ---------------------------------------------------------------------------------------------------------- registry
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "mobilenet_v3_small": partial(MobileNetV3, "small"),
    "mobilenet_v3_large": partial(MobileNetV3, "large"),
}


def load_pretrained(module: nn.Module, path: str) -> list[str]:
    """Load a torchvision-layout ImageNet state dict from a local file into `module`; returns the skipped keys.

    Keys absent from the backbone (the ImageNet classifier) and tensors of another shape (a 1-channel or small-input
    stem) are skipped, so the same file serves grayscale and small images."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"pretrained weights file not found: {file} (latenthash never downloads weights; "
                        "save torchvision's state dict to a local file and pass its path)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read pretrained weights {file}: {exc}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise DataError(f"{file} holds no tensor that fits this backbone: is it the right architecture?")
    module.load_state_dict(usable, strict=False)
    return sorted(set(state) - set(usable))


def build_backbone(name: str, *, in_channels: int, image_size: tuple[int, int], pretrained: str | None = None,
                   **options) -> tuple[nn.Module, int]:
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise InvalidInput(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None
    if name == "cnn":
        options.setdefault("image_size", image_size)
    module = factory(in_channels=in_channels, **options)
    if pretrained:
        load_pretrained(module, pretrained)
    return module, module.out_dim
