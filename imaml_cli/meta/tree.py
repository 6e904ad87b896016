"""Vector arithmetic on parameter dicts, so that CG and the solvers read like the maths.

Under ``vmap`` every function here acts per task: a dot product returns one scalar per task.
Outside ``vmap``, ``batch_dims=1`` treats the leading dimension as the tasks instead; scalars per
task (``alpha``, ``condition``) then have shape ``[T]`` and broadcast over the rest.
"""

import torch

Params = dict[str, torch.Tensor]


def dot(a: Params, b: Params, batch_dims: int = 0) -> torch.Tensor:
    if batch_dims == 0:
        return sum((a[k] * b[k]).sum() for k in a)
    return sum((a[k] * b[k]).flatten(batch_dims).sum(batch_dims) for k in a)


def per_task(scalar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalars per task (``[T]``, or ``[]`` under vmap) shaped to broadcast over ``like``."""
    return scalar.reshape(scalar.shape + (1,) * (like.dim() - scalar.dim()))


def add(a: Params, b: Params, alpha=1.0) -> Params:
    """a + alpha * b; alpha may be a per-task scalar tensor."""
    # One fused pass over the parameters either way, instead of a product and then a sum.
    if isinstance(alpha, torch.Tensor):
        return {k: torch.addcmul(a[k], b[k], per_task(alpha, a[k])) for k in a}
    return {k: torch.add(a[k], b[k], alpha=alpha) for k in a}


def scale(a: Params, alpha) -> Params:
    return {k: alpha * v for k, v in a.items()}


def where(condition: torch.Tensor, a: Params, b: Params) -> Params:
    """a where the (per-task, scalar) condition holds, else b."""
    return {k: torch.where(per_task(condition, a[k]), a[k], b[k]) for k in a}


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Params) -> Params:
    return {k: v.detach() for k, v in a.items()}


def norm(a: Params, batch_dims: int = 0) -> torch.Tensor:
    return dot(a, a, batch_dims).sqrt()


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0.

    Fixed-step CG keeps iterating after it has converged; there both are 0 and the step must be 0,
    not NaN.
    """
    nonzero = denominator != 0
    return torch.where(nonzero, numerator, torch.zeros_like(numerator)) / torch.where(
        nonzero, denominator, torch.ones_like(denominator))
