"""Vector arithmetic on parameter dicts, so that CG and the solvers read like the maths.

Under ``vmap`` every function here acts per task: a dot product returns one scalar per task.
"""

import torch

Params = dict[str, torch.Tensor]


def dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def add(a: Params, b: Params, alpha=1.0) -> Params:
    """a + alpha * b; alpha may be a per-task scalar tensor."""
    return {k: a[k] + alpha * b[k] for k in a}


def scale(a: Params, alpha) -> Params:
    return {k: alpha * v for k, v in a.items()}


def where(condition: torch.Tensor, a: Params, b: Params) -> Params:
    """a where the (per-task, scalar) condition holds, else b."""
    return {k: torch.where(condition, a[k], b[k]) for k in a}


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Params) -> Params:
    return {k: v.detach() for k, v in a.items()}


def norm(a: Params) -> torch.Tensor:
    return dot(a, a).sqrt()


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0.

    Fixed-step CG keeps iterating after it has converged; there both are 0 and the step must be 0,
    not NaN.
    """
    nonzero = denominator != 0
    return torch.where(nonzero, numerator, torch.zeros_like(numerator)) / torch.where(
        nonzero, denominator, torch.ones_like(denominator))
