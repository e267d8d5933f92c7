"""The latent-hash-layer network: backbone -> F4 (feature) -> H (`bits` sigmoid units) -> F5 (classifier).

After point-wise training on class labels, `H >= 0.5` is an image's binary code and F4's activations its
real-valued feature for the cosine re-rank (Lin et al., "Deep learning of binary hash codes for fast image
retrieval", CVPRW 2015).

The network takes float NCHW images already normalized; `ExportWrapper` puts uint8 NHWC decoding, scaling,
normalization and transposition in front of it so an exported graph needs nothing but raw pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from latenthash.errors import InvalidInput
from latenthash.export.backbones import build_backbone


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    backbone: str = "cnn"
    bits: int = 48
    feature_dim: int = 256
    num_classes: int = 10
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    dropout: float = 0.0
    pretrained: str | None = None  # local path to ImageNet weights (torchvision state-dict layout)
    copy_dim: int = 64  # size of the copy descriptor (`CopyHead`); 0: none
    backbone_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d.setdefault("copy_dim", 0)  # checkpoints from before copy heads have none
        return cls(**d)


COPY_SIDE = 64  # the copy head sees images at most this many pixels a side (larger ones average-pooled down)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CopyHead(nn.Module):
    """A small CNN of its own, beside the hash network, from the normalized pixels to a `dim`-d descriptor that
    tells an image's altered copies (re-encoded, rescaled, shifted, re-exposed) from other images, near-twins of
    its class included. Trained instance-contrastively (`train.copy_loss`); it shares no weights with the class
    path, so the codes and features keep their retrieval quality. A 2 x 2 pooled map keeps the coarse layout,
    which is what separates a copy from a near-twin; large inputs are average-pooled to at most COPY_SIDE a side
    first (copies are judged on a thumbnail)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], dim: int, width: int = 16):
        super().__init__()
        shrink = max(1, -(-max(image_size) // COPY_SIDE))
        h, w = image_size[0] // shrink // 4, image_size[1] // shrink // 4
        if min(h, w) < 2:
            raise InvalidInput(f"a copy head needs images of at least {8 * shrink} pixels a side, got {image_size}; "
                               "train with copy_dim=0 (--copy-dim 0)")
        self.net = nn.Sequential(
            nn.AvgPool2d(shrink) if shrink > 1 else nn.Identity(),
            _block(in_channels, width), _block(width, width), nn.MaxPool2d(2),
            _block(width, 2 * width), _block(2 * width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AvgPool2d((h // 2, w // 2)),  # a 2 x 2 map (edge rows of odd sizes out)
            nn.Flatten(), nn.Linear(16 * width, 256), nn.ReLU(inplace=True), nn.Linear(256, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HashNet(nn.Module):
    """backbone -> F4 -> H -> F5, and beside it an optional `copy_head`. `forward` returns (logits, probs,
    features)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone, out_dim = build_backbone(
            config.backbone, in_channels=config.in_channels, image_size=config.image_size, pretrained=config.pretrained,
            **config.backbone_options,
        )
        self.f4 = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(out_dim, config.feature_dim),
                                nn.BatchNorm1d(config.feature_dim), nn.ReLU(inplace=True))
        self.latent = nn.Linear(config.feature_dim, config.bits)
        self.classifier = nn.Linear(config.bits, config.num_classes)
        # made last: the class path's initial weights do not depend on whether there is a copy head
        self.copy_head = CopyHead(config.in_channels, config.image_size, config.copy_dim) if config.copy_dim else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.f4(self.backbone(x))
        probs = torch.sigmoid(self.latent(features))
        return self.classifier(probs), probs, features


class ExportWrapper(nn.Module):
    """uint8 NHWC in; `probs`, L2-normalized `features` and `logits` out, and L2-normalized `copies` where the
    network has a copy head. What ONNX export traces."""

    def __init__(self, net: HashNet):
        super().__init__()
        self.net = net
        c = net.config.in_channels
        mean = torch.tensor(net.config.mean, dtype=torch.float32).view(1, c, 1, 1) * 255.0
        std = torch.tensor(net.config.std, dtype=torch.float32).view(1, c, 1, 1) * 255.0
        self.register_buffer("mean255", mean, persistent=False)
        self.register_buffer("std255", std, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images.permute(0, 3, 1, 2).to(torch.float32) - self.mean255) / self.std255
        logits, probs, features = self.net(x)
        if self.net.copy_head is None:
            return probs, _unit(features), logits
        return probs, _unit(features), logits, _unit(self.net.copy_head(x))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
