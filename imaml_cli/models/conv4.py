"""The four-block convolutional network of MAML and iMAML (Omniglot and Mini-ImageNet variants).

Batch norm always uses the statistics of the batch it sees and keeps no running averages: the
network then computes the same function under ``vmap`` (one batch per task), at meta-training and at
meta-test, and has no buffers that functional calls would have to thread through.

The convolutions have no bias: batch norm subtracts the per-channel mean right after them, so a
bias would have an exactly zero gradient up to rounding noise, which Adam would amplify into steps.

Initialisation (as in MAML's reference code): convolution kernels Xavier-uniform, batch-norm scale
1 and shift 0, head weights normal with std 0.01 and bias 0.
"""

import torch
import torch.nn.functional as F
from torch import nn

from imaml_cli.models.activations import activation_fn


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, pool: bool, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.pool = pool
        self.activation = activation_fn(activation)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class ConvNet(nn.Module):
    """``blocks`` conv-BN-activation blocks, downsampling by stride or max-pool, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, channels: int, num_outputs: int,
                 blocks: int = 4, stride: int = 1, pool: bool = False, activation: str = "relu"):
        super().__init__()
        layers, size = [], image_size
        for i in range(blocks):
            layers.append(ConvBlock(in_channels if i == 0 else channels, channels, stride, pool, activation))
            size = (size - 1) // stride + 1
            if pool:
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * size * size, num_outputs)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def omniglot_convnet(num_outputs: int, activation: str = "relu") -> ConvNet:
    """1x28x28 input; 64 channels, stride 2 (28 -> 14 -> 7 -> 4 -> 2); 112,965 parameters at 5 ways."""
    return ConvNet(1, 28, 64, num_outputs, stride=2, activation=activation)


def miniimagenet_convnet(num_outputs: int, activation: str = "relu") -> ConvNet:
    """3x84x84 input; 32 channels, 2x2 max-pool (84 -> 42 -> 21 -> 10 -> 5); 32,773 parameters at 5 ways."""
    return ConvNet(3, 84, 32, num_outputs, pool=True, activation=activation)
