"""The outer learning rate of each meta-step.

A pure function of the meta-step, so that a resumed run follows the schedule exactly without any
state of its own in the checkpoint.
"""

import math


def outer_learning_rate(optimizer: dict, step: int, total: int) -> float:
    """The rate for meta-step ``step`` (1, 2, …) of ``total``, from ``outer_optimizer``'s settings:
    a linear warm-up from lr / warmup_steps to lr over the first ``warmup_steps`` steps, then
    ``constant`` lr, ``cosine`` decay from lr to lr · min_lr_fraction at meta-step ``total``
    (Loshchilov & Hutter 2017, without restarts), or ``step``: lr · gamma^k where k milestones lie
    before ``step`` (PyTorch's MultiStepLR), so that milestone m reduces the rate from meta-step m + 1."""
    lr, warmup = optimizer["lr"], optimizer["warmup_steps"]
    if step <= warmup:
        return lr * step / warmup
    if optimizer["schedule"] == "constant":
        return lr
    if optimizer["schedule"] == "step":
        return lr * optimizer["gamma"] ** sum(step > m for m in optimizer["milestones"])
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * optimizer["min_lr_fraction"]
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
