"""The four-block convolutional network of MAML and iMAML (Omniglot and Mini-ImageNet variants).

Batch norm always uses the statistics of the batch it sees and keeps no running averages: the
network then computes the same function under ``vmap`` (one batch per task), at meta-training and at
meta-test, and has no buffers that functional calls would have to thread through.

The convolutions have no bias: batch norm subtracts the per-channel mean right after them, so a
bias would have an exactly zero gradient up to rounding noise, which Adam would amplify into steps.

Initialisation (as in MAML's reference code): convolution kernels Xavier-uniform, batch-norm scale
1 and shift 0, head weights normal with std 0.01 and bias 0.

Two implementations of the same function with the same parameters (``conv_impl``):

- ``native``: ``F.conv2d`` and ``F.batch_norm`` on NCHW images. Under ``vmap`` with per-task
  weights the convolution becomes a grouped convolution over the tasks.
- ``im2col`` (default): channels-last activations, patches gathered once per layer and multiplied
  by the kernel as a matrix, so that ``vmap`` makes one batched matrix product over the tasks.
  Under ``vmap`` alone it runs about as fast as ``native`` (BENCHMARKS.md), but its double
  backward works under ``vmap`` (``F.batch_norm``'s does not), which the cached
  reverse-over-reverse Hessian-vector products need, and it is the layout of the hand-written
  passes in ``models/fused.py``. When the patches are narrower than the layer (the first layer:
  9 or 27 values per patch), batch norm is folded into that product: the output's mean and
  variance per channel follow from the patches' own mean and covariance, which saves several
  passes over the largest activation of the network.
"""

import torch
import torch.nn.functional as F
from torch import nn

from imaml_cli.models.activations import activation_fn
from imaml_cli.models.im2col import im2col

CONV_IMPLS = ("native", "im2col")


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

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on ``[N, H, W, C]`` activations, as a matrix product over patches."""
        conv = self.conv
        patches = im2col(x, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        n, ho, wo, width = patches.shape
        patches = patches.reshape(n * ho * wo, width)
        # (C_out, C_in, kh, kw) -> (kh, kw, C_in) x C_out, the patch order of im2col.
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, width).t()
        if width <= conv.out_channels:
            x = self._folded_batch_norm(patches, weight)
        else:
            x = _batch_norm_rows(patches @ weight, self.norm.weight, self.norm.bias, self.norm.eps)
        x = self.activation(x).view(n, ho, wo, conv.out_channels)
        if self.pool:
            x = F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return x

    def _folded_batch_norm(self, patches: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # BN(P W) = P (W s) + (b - mean(P) W s), s = g / sqrt(diag(Wᵀ cov(P) W) + eps): the same
        # function of the parameters, without normalising the product afterwards.
        mean = patches.mean(0)
        centered = patches - mean
        covariance = centered.t() @ centered / patches.shape[0]
        variance = ((covariance @ weight) * weight).sum(0)
        scale = self.norm.weight * torch.rsqrt(variance + self.norm.eps)
        return torch.addmm(self.norm.bias - (mean @ weight) * scale, patches, weight * scale)


def _batch_norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch norm over the rows of ``[rows, C]``, with the batch's statistics."""
    # Two passes rather than torch.var_mean, whose reduction over the outer dimension is about
    # 40x slower on CPU than a mean.
    centered = x - x.mean(0)
    scale = weight * torch.rsqrt(centered.square().mean(0) + eps)
    return torch.addcmul(bias, centered, scale)


class ConvNet(nn.Module):
    """``blocks`` conv-BN-activation blocks, downsampling by stride or max-pool, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, channels: int, num_outputs: int,
                 blocks: int = 4, stride: int = 1, pool: bool = False, activation: str = "relu",
                 conv_impl: str = "im2col"):
        super().__init__()
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}")
        self.conv_impl = conv_impl
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
        if self.conv_impl == "native":
            return self.head(self.features(x).flatten(1))
        x = x.permute(0, 2, 3, 1)
        for block in self.features:
            x = block.forward_channels_last(x)
        n, h, w, c = x.shape
        # The head's inputs are ordered (C, H, W) as in the native network; reorder its columns.
        weight = self.head.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, h * w * c)
        return F.linear(x.reshape(n, h * w * c), weight, self.head.bias)


def omniglot_convnet(num_outputs: int, activation: str = "relu", conv_impl: str = "im2col",
                     in_channels: int = 1, image_size: int = 28) -> ConvNet:
    """1x28x28 input; 64 channels, stride 2 (28 -> 14 -> 7 -> 4 -> 2); 112,965 parameters at 5 ways.

    ``in_channels`` and ``image_size`` fit the same design to other images (dataset=image_folder).
    """
    return ConvNet(in_channels, image_size, 64, num_outputs, stride=2, activation=activation, conv_impl=conv_impl)


def miniimagenet_convnet(num_outputs: int, activation: str = "relu", conv_impl: str = "im2col",
                         in_channels: int = 3, image_size: int = 84) -> ConvNet:
    """3x84x84 input; 32 channels, 2x2 max-pool (84 -> 42 -> 21 -> 10 -> 5); 32,773 parameters at 5 ways.

    ``in_channels`` and ``image_size`` (at least 16: four halvings) fit the same design to other images.
    """
    return ConvNet(in_channels, image_size, 32, num_outputs, pool=True, activation=activation, conv_impl=conv_impl)

