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
    backbone_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class HashNet(nn.Module):
    """backbone -> F4 -> H -> F5. `forward` returns (logits, probs, features)."""

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.f4(self.backbone(x))
        probs = torch.sigmoid(self.latent(features))
        return self.classifier(probs), probs, features


class ExportWrapper(nn.Module):
    """uint8 NHWC in; `probs`, L2-normalized `features` and `logits` out. What ONNX export traces."""

    def __init__(self, net: HashNet):
        super().__init__()
        self.net = net
        c = net.config.in_channels
        mean = torch.tensor(net.config.mean, dtype=torch.float32).view(1, c, 1, 1) * 255.0
        std = torch.tensor(net.config.std, dtype=torch.float32).view(1, c, 1, 1) * 255.0
        self.register_buffer("mean255", mean, persistent=False)
        self.register_buffer("std255", std, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).to(torch.float32) - self.mean255) / self.std255
        logits, probs, features = self.net(x)
        features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return probs, features, logits
