"""ResNet-18 with GroupNorm instead of BatchNorm, which federated averaging handles badly."""

from __future__ import annotations

from torch import nn

from fedlearn.models._common import as_pair, check_channels, check_classes

GN_GROUPS = 2  # Hsieh et al. 2020, "The Non-IID Data Quagmire of Decentralized ML"
SMALL_IMAGE_MAX = 64  # at or below this (both sides) the CIFAR-style stem is used


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 2 groups; a named function (not a lambda) so models stay picklable."""
    return nn.GroupNorm(GN_GROUPS, num_channels)


def resnet18_gn(in_channels: int, num_classes: int, image_size: int | tuple[int, int]) -> nn.Module:
    """torchvision ``resnet18(weights=None, num_classes=..., norm_layer=GroupNorm(2, c))``, adapted.

    Two adaptations: images with both sides <= 64 get the CIFAR stem (3x3 stride-1 conv1, no
    max-pool) so 32x32 inputs are not shrunk to 8x8 before layer1; and conv1 takes ``in_channels``
    (e.g. 1 for MNIST) instead of 3. Untrained weights only (no internet, no pretrained files).
    torchvision is imported here, not at module load, so runs that never build a ResNet start faster.
    """
    from torchvision.models.resnet import BasicBlock, ResNet


    in_channels = check_channels(in_channels, "resnet18-gn")
    num_classes = check_classes(num_classes, "resnet18-gn")
    h, w = as_pair(image_size, "resnet18-gn")
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=group_norm)
    if max(h, w) <= SMALL_IMAGE_MAX:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    else:
        return model  # torchvision's own ImageNet stem, already initialised
    # The init torchvision gives its own conv1.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
