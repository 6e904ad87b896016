"""The internal precision of float32 matrix products and convolutions, set for one meta-step.

Tensors stay float32 either way; only the arithmetic inside the products changes. ``bf16`` runs
them through oneDNN in bfloat16 with float32 accumulation (AMX on recent Xeons); ``tf32`` uses
TensorFloat-32 tensor cores on CUDA. torch keeps these settings process-wide; the context
manager restores them afterwards.
"""

from contextlib import contextmanager

import torch

PRECISIONS = ("ieee", "bf16", "tf32")
SUPPORTED = {"cpu": ("ieee", "bf16"), "cuda": ("ieee", "tf32")}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


@contextmanager
def matmul_precision(precision: str, device: torch.device):
    check_precision(precision)
    supported = SUPPORTED.get(device.type, ("ieee",))
    if precision not in supported:
        raise ValueError(f"precision {precision!r} is not available on {device.type}; "
                         f"choose one of {supported}")
    if device.type == "cuda":
        backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    elif device.type == "cpu":
        backends = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)
    else:
        backends = ()
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = precision
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value
