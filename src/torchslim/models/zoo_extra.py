"""More presets, chosen to exercise structured pruning's coupling rules.

* ``resnet20`` / ``resnet56``: CIFAR-style ResNets (He et al. 2016): residual
  additions tie the channels of every block in a stage.
* ``vgg_small``: a small VGG with BatchNorm: plain conv chains and a flatten
  into the classifier.
* ``mobilenetv2``: inverted residual blocks (expand 1x1, depthwise 3x3, project
  1x1) with linear bottlenecks, MobileNetV2-style.
* ``vit_tiny``: a small vision transformer (patch embedding, pre-norm blocks of
  ``nn.MultiheadAttention`` and an MLP, mean pooling).

Like the presets in :mod:`torchslim.models.zoo`, each takes ``in_channels``,
``num_classes`` and ``input_size`` (28x28 Fashion-MNIST and 8x8 digits both work)
and has a tiny twin through its width and depth arguments, e.g.
``create("resnet56", width=4, blocks=1)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torchslim.errors import ModelError
from torchslim.models.registry import register_preset


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks`` basic blocks (width, 2x, 4x; stride 1, 2, 2), pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: int):
        super().__init__()
        if width < 1 or blocks < 1:
            raise ModelError(f"CIFAR ResNet needs width >= 1 and blocks >= 1, got width={width}, blocks={blocks}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                          for b in range(blocks)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_preset
def resnet20(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
             width: int = 16, blocks: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, 1x1 projection shortcuts; 0.27M params)."""
    return CifarResNet(in_channels, num_classes, width, blocks)


@register_preset
def resnet56(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
             width: int = 16, blocks: int = 9) -> nn.Module:
    """CIFAR ResNet-56 (3 stages x 9 basic blocks, 16/32/64 channels, 1x1 projection shortcuts; 0.86M params)."""
    return CifarResNet(in_channels, num_classes, width, blocks)


@register_preset
def vgg_small(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
              width: int = 32, fc: int = 256, dropout: float = 0.3) -> nn.Module:
    """Small VGG with BatchNorm: 3 stages of 2x(conv-BN-ReLU) + max-pool (32, 64, 128 channels), fc 256."""
    from torchslim.models.zoo import ConvNet, _conv_bn_relu, _flat_features

    layers: list[nn.Module] = []
    cin = in_channels
    for i in range(3):
        cout = width * 2**i
        layers += [*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout), nn.MaxPool2d(2)]
        cin = cout
    features = nn.Sequential(*layers)
    flat = _flat_features(features, in_channels, input_size)
    classifier = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc, num_classes))
    return ConvNet(features, classifier)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv, inverted-residual stages, 1x1 conv to ``last_channels``, pool, dropout, linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int, expansion: int, blocks: int,
                 last_channels: int, dropout: float):
        super().__init__()
        if min(width, expansion, blocks, last_channels) < 1:
            raise ModelError("MobileNetV2 needs width, expansion, blocks and last_channels >= 1")
        # (expansion, channels, blocks, stride): MobileNetV2's schedule cut to four stages for 28x28 inputs.
        schedule = [(1, width, 1, 1), (expansion, width * 3 // 2, blocks, 2),
                    (expansion, width * 2, blocks, 2), (expansion, width * 4, blocks, 1)]
        stem = 2 * width
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
        cin = stem
        for t, c, n, s in schedule:
            for b in range(n):
                layers.append(InvertedResidual(cin, c, s if b == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_preset
def mobilenetv2(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: int = 16,
                expansion: int = 6, blocks: int = 2, last_channels: int = 256, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2-style net: inverted residuals with depthwise convs (16-64 channels, x6 expansion; 0.2M params)."""
    return MobileNetV2(in_channels, num_classes, width, expansion, blocks, last_channels, dropout)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv) + learned positions, transformer blocks, LayerNorm, mean over tokens, linear."""

    def __init__(self, in_channels: int, num_classes: int, input_size: int, patch_size: int, dim: int,
                 depth: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        if patch_size < 1 or input_size < patch_size:
            raise ModelError(f"patch_size must be in [1, input_size={input_size}], got {patch_size}")
        if dim % heads:
            raise ModelError(f"dim ({dim}) must be divisible by heads ({heads})")
        tokens = (input_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@register_preset
def vit_tiny(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, patch_size: int = 4,
             dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0) -> nn.Module:
    """Small vision transformer: 4x4 patches, 4 blocks of 4-head attention (dim 64) + MLP 128 (0.14M params)."""
    return VisionTransformer(in_channels, num_classes, input_size, patch_size, dim, depth, heads, mlp_dim, dropout)
