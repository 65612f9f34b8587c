"""CIFAR-style VGG with BatchNorm: VGG11-BN and VGG19-BN (METHOD 3.2).

Module names follow torchvision's vgg*_bn (features.N, classifier.N), so an ImageNet state dict
maps directly (common/models/pretrained.py). The model is *sequential*: features, avgpool,
flatten, classifier, applied in order. Generalized layers (METHOD 4.2): every conv ReLU, the
Flatten, and the two ReLUs of the classifier; the head starts at the first classifier Linear.
"""
from __future__ import annotations

from torch import nn

from common.models.chain import ChainModel, init_norm_or_linear

from common.models.resnet import scale_channels

POOL = "M"
# METHOD 3.2: cfg "A" (VGG11) and cfg "E" (VGG19).
CFG_A: tuple[int | str, ...] = (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL)
CFG_E: tuple[int | str, ...] = (
    64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
)


class VGG(ChainModel):
    """Conv3x3(bias)-BN-ReLU stacks with MaxPool(2, 2), AdaptiveAvgPool to 1x1, Flatten,
    classifier Linear(512, 4096)-ReLU-Dropout(0.5)-Linear(4096, 4096)-ReLU-Dropout(0.5)-Linear(4096, C).

    `width` scales conv channels and the 4096 hidden units (round, at least 1). The max-pools use
    ceil_mode=True: identical to the reference for sizes divisible by 32, and it keeps 28x28
    inputs (Fashion-MNIST) from shrinking to 0x0 at the fifth pool (28-14-7-4-2-1).
    Init: Kaiming-normal (fan_out, relu) convs with zero bias, BN 1/0, Linear N(0, 0.01)/0.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        del image_size  # the 1x1 average pool makes the network size-agnostic
        layers: list[nn.Module] = []
        current = in_channels
        for item in cfg:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            channels = scale_channels(int(item), width)
            layers += [nn.Conv2d(current, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=False)]
            current = channels
        hidden = scale_channels(4096, width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            nn.Linear(current, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            else:
                init_norm_or_linear(m)



def vgg11(**kwargs) -> VGG:
    """VGG11-BN (cfg A); 11 generalized layers, head from gen index 9."""
    return VGG(CFG_A, **kwargs)


def vgg19(**kwargs) -> VGG:
    """VGG19-BN (cfg E); 19 generalized layers, head from gen index 17."""
    return VGG(CFG_E, **kwargs)
