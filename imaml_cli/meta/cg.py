"""Linear solvers for the implicit meta-gradient with a fixed number of steps, written to run per
task under vmap (or on all tasks at once with ``batch_dims=1``): conjugate gradient, and a truncated
Neumann series (as betty and torchopt offer)."""

from typing import Callable, NamedTuple

import torch

from imaml_cli.meta import tree
from imaml_cli.meta.tree import Params


class CGResult(NamedTuple):
    solution: Params
    residual_norm: torch.Tensor  # ‖b − A x‖, per system
    steps_taken: torch.Tensor  # iterations that moved x, per system (fewer after a stop)
    on_boundary: torch.Tensor  # per system: the solve ended on the sphere ‖x‖ = radius


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int,
                       stop_at_negative_curvature: bool = False, radius: torch.Tensor | None = None,
                       batch_dims: int = 0) -> CGResult:
    """Approximately solve A x = b from x = 0 with ``steps`` CG iterations.

    The step count is fixed so that every task of a batch runs the same operations; a task that has
    converged keeps taking zero steps (safe division turns 0/0 into 0).

    With ``stop_at_negative_curvature`` (truncated Newton, Nocedal & Wright Alg. 7.1), a direction
    p with pᵀAp ≤ 0 ends the solve: the iterate so far is kept, or b itself (steepest descent) when
    that happens on the first iteration. A Newton system away from a minimum can be indefinite and
    plain CG would then step towards a maximum.

    With ``radius`` (per system), an iterate that would leave the ball ‖x‖ ≤ radius stops on its
    sphere along the current direction, as Steihaug-Toint CG does in a trust region (Nocedal &
    Wright Alg. 7.2). From x = 0 on a positive definite system ‖x‖ grows at every step and stays
    below ‖A⁻¹b‖ (ibid. Thm. 7.3), so a radius of at least ‖b‖/λ_min(A) never acts there.

    ``batch_dims=1`` solves one system per entry of the leading dimension (outside ``vmap``, for
    a ``matvec`` that acts on all tasks at once); see ``tree``.
    """
    x = tree.zeros_like(b)
    r, p = b, b
    rr = tree.dot(r, r, batch_dims)
    active = torch.ones_like(rr, dtype=torch.bool)
    on_boundary = torch.zeros_like(active)
    taken = torch.zeros_like(rr)
    for i in range(steps):
        ap = matvec(p)
        curvature = tree.dot(p, ap, batch_dims)
        if stop_at_negative_curvature:
            negative = curvature <= 0
            if i == 0:
                x = tree.where(negative, b, x)
            active = active & ~negative
        step_ok = active.to(rr.dtype)
        alpha = tree.safe_divide(rr, curvature) * step_ok
        if radius is not None:
            xx, xp, pp = tree.dot(x, x, batch_dims), tree.dot(x, p, batch_dims), tree.dot(p, p, batch_dims)
            leaves = active & (xx + 2 * alpha * xp + alpha ** 2 * pp > radius ** 2)
            # The positive root τ of ‖x + τp‖ = radius; x is inside, so the discriminant is ≥ xp².
            to_sphere = tree.safe_divide(-xp + (xp ** 2 + pp * (radius ** 2 - xx)).clamp(min=0).sqrt(), pp)
            alpha = torch.where(leaves, to_sphere, alpha)
            active, on_boundary = active & ~leaves, on_boundary | leaves
        taken = taken + step_ok
        x = tree.add(x, p, alpha)
        r = tree.add(r, ap, -alpha)
        rr_next = tree.dot(r, r, batch_dims)
        p = tree.add(r, p, tree.safe_divide(rr_next, rr))
        rr = rr_next
    # The recursive residual drifts from the true one only by rounding; an extra matvec to
    # recompute it would cost as much as a CG step.
    return CGResult(x, rr.sqrt(), taken, on_boundary)


SOLVERS = ("cg", "neumann")


def neumann_series(matvec: Callable[[Params], Params], b: Params, steps: int, step_size: float,
                   batch_dims: int = 0) -> CGResult:
    """Approximately solve A x = b by the truncated Neumann series x = α Σ_{k<steps} (I − αA)^k b.

    This is Richardson's iteration x ← x + α(b − A x) from x = 0; the terms r_k = (I − αA)^k b are
    also its residuals, so ``steps`` matrix-vector products (as many as CG's ``steps``) give the
    solution and its exact residual r_steps = b − A x. The series converges when every eigenvalue
    of αA lies in (0, 2): for A = I + H/λ, a positive semi-definite H and α < 2/(1 + ‖H‖/λ).
    Unlike CG it takes no dot products and never divides, but it converges only linearly.
    """
    x, r = tree.zeros_like(b), b
    for _ in range(steps):
        x = tree.add(x, r, step_size)
        r = tree.add(r, matvec(r), -step_size)
    per_system = tree.dot(b, b, batch_dims)
    return CGResult(x, tree.norm(r, batch_dims), torch.full_like(per_system, steps),
                    torch.zeros_like(per_system, dtype=torch.bool))
