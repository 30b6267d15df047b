"""The model zoo: presets as plain functions with literal default arguments.

Every preset takes ``in_channels``, ``num_classes`` and ``input_size`` so the
same architecture runs on Fashion-MNIST (1x28x28) and on sklearn digits
(1x8x8); flatten sizes are computed from a dummy forward, never hand-kept.
Each has a tiny twin reachable through its width arguments, for tests; presets
declare those arguments (``width_args``) so that ``derive_student`` can scale them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torchslim.models.registry import register_preset


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Number of features ``features`` produces for one input, found by running it."""
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, input_size, input_size))
    return out.flatten(1).shape[1]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """A feature extractor followed by a classifier; the shape every CNN preset shares."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """Flatten, then a stack of fully connected layers with ReLU between them."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


@register_preset(width_args=("hidden1", "hidden2"))
def lenet300_100(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 hidden1: int = 300, hidden2: int = 100) -> nn.Module:
    """LeNet-300-100: the fully connected net of LeCun et al. and Han et al. (266k params on 28x28)."""
    return MLP(in_channels * input_size * input_size, [hidden1, hidden2], num_classes)


@register_preset(width_args=("conv1", "conv2", "fc"))
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
           conv1: int = 20, conv2: int = 50, fc: int = 500) -> nn.Module:
    """LeNet-5, Caffe variant: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc (431k params on 28x28)."""
    # Small inputs (8x8 digits) cannot take two unpadded 5x5 convs; pad so the
    # layer structure stays the same.
    pad = 0 if input_size >= 16 else 2
    features = nn.Sequential(
        nn.Conv2d(in_channels, conv1, 5, padding=pad), nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5, padding=pad), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_channels, input_size)
    classifier = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))
    return ConvNet(features, classifier)


@register_preset(width_args=("width", "fc"))
def fmnist_teacher(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                   width: int = 32, fc: int = 512, dropout: float = 0.3) -> nn.Module:
    """VGG-style teacher: 2x(conv-BN-ReLU) x2 blocks (32, 64 channels), fc 512 (1.68M params); >=92% on Fashion-MNIST."""
    features = nn.Sequential(
        *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_channels, input_size)
    classifier = nn.Sequential(
        nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc, num_classes)
    )
    return ConvNet(features, classifier)


@register_preset(width_args=("width", "fc"))
def fmnist_student(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                   width: int = 16, fc: int = 96) -> nn.Module:
    """Small student: conv-BN-ReLU-pool (16, 32 channels), fc 96 (156k params, <1/10 of fmnist_teacher)."""
    features = nn.Sequential(
        *_conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_channels, input_size)
    classifier = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))
    return ConvNet(features, classifier)


@register_preset(width_args=("conv", "fc"))
def article_teacher(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                    conv: int = 32, fc: int = 128) -> nn.Module:
    """The reference article's teacher, flatten size corrected: conv 32@5x5, pool, fc 128, fc."""
    features = nn.Sequential(nn.Conv2d(in_channels, conv, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    flat = _flat_features(features, in_channels, input_size)  # 32*12*12 on 28x28, not 32*4*4
    classifier = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))
    return ConvNet(features, classifier)


@register_preset(width_args=("conv", "fc"))
def article_student(in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                    conv: int = 16, fc: int = 64) -> nn.Module:
    """The reference article's student, flatten size corrected: conv 16@3x3, pool, fc 64, fc."""
    features = nn.Sequential(nn.Conv2d(in_channels, conv, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    flat = _flat_features(features, in_channels, input_size)  # 16*13*13 on 28x28, not 16*6*6
    classifier = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))
    return ConvNet(features, classifier)
