"""Resizing of uint8 image batches, shared by the dataset loaders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bounds the float32 copy made while resizing (CHUNK images at a time).
CHUNK = 2048


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[n, C, H, W]`` uint8 images to ``size`` x ``size`` with antialiasing.

    Antialiased bilinear interpolation is what torchvision's ``Resize`` (and PIL's bilinear
    filter) does when downscaling, so the result matches the usual few-shot pipelines.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(*images.shape[:-2], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], CHUNK):
        x = images[start:start + CHUNK].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[start:start + CHUNK] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out
