"""Inner solvers: adapt one task's parameters φ from the meta-parameters θ.

Each solver minimises the proximal objective L̂(φ) + λ/2‖φ − θ‖² of one task (λ = 0 gives
MAML's plain fine-tuning) and is written for a single task; the algorithms vmap it over the tasks of
a meta-batch. Everything is a pure function of its inputs, so MAML can differentiate through the GD
solver while iMAML never does.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad

from imaml_cli.meta import tree
from imaml_cli.meta.cg import conjugate_gradient
from imaml_cli.meta.hvp import hessian_operator
from imaml_cli.meta.tree import Params

Loss = Callable[[Params], torch.Tensor]

# Step sizes the HF line search tries along the Newton direction, all at once. Zero is among them,
# so an iteration never increases the proximal objective.
LINE_SEARCH_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)


def proximal(loss: Loss, theta: Params, lam: float) -> Loss:
    """φ ↦ loss(φ) + λ/2‖φ − θ‖²."""
    if lam == 0:
        return loss

    def objective(phi: Params) -> torch.Tensor:
        diff = tree.add(phi, theta, -1.0)
        return loss(phi) + 0.5 * lam * tree.dot(diff, diff)

    return objective


@dataclass(frozen=True)
class GradientDescent:
    """``steps`` gradient steps of size ``lr`` on the proximal objective, starting from θ."""

    steps: int
    lr: float

    def __call__(self, loss: Loss, theta: Params, lam: float) -> Params:
        phi = theta
        for _ in range(self.steps):
            g = grad(loss)(phi)
            if lam == 0:
                phi = tree.add(phi, g, -self.lr)
            else:
                # φ − lr(∇L̂(φ) + λ(φ − θ)) with the proximal gradient written out: two fused passes
                # over the parameters instead of the six that differentiating the penalty takes.
                phi = {k: torch.add(torch.lerp(phi[k], theta[k], self.lr * lam), g[k], alpha=-self.lr)
                       for k in phi}
        return phi

    def batched(self, gradient: Callable[[Params], Params], theta: Params, lam: float, tasks: int) -> Params:
        """The same steps for ``tasks`` tasks at once, from their batched gradient ``[T, ...]``.

        Not differentiable (it updates in place); for algorithms that do not differentiate
        through the inner loop.
        """
        phi = {k: v.expand(tasks, *v.shape).clone() for k, v in theta.items()}
        for _ in range(self.steps):
            g = gradient(phi)
            for k, v in phi.items():
                if lam != 0:
                    v.lerp_(theta[k], self.lr * lam)
                v.add_(g[k], alpha=-self.lr)
        return phi


@dataclass(frozen=True)
class NewtonCG:
    """Hessian-free Newton (iMAML-HF): ``steps`` Newton iterations from θ.

    Each solves (∇²L̂ + λI) d = −∇ with ``cg_steps`` truncated CG steps on Hessian-vector products
    and moves along d by the line-search step with the lowest proximal objective, chosen per task.
    """

    steps: int
    cg_steps: int
    hvp_mode: str = "reverse_over_reverse"

    def __call__(self, loss: Loss, theta: Params, lam: float) -> Params:
        objective = proximal(loss, theta, lam)
        phi = theta
        for _ in range(self.steps):
            g = grad(objective)(phi)
            direction, _ = conjugate_gradient(hessian_operator(objective, phi, self.hvp_mode),
                                              tree.scale(g, -1.0), self.cg_steps, stop_at_negative_curvature=True)
            candidates = [tree.add(phi, direction, step) for step in LINE_SEARCH_STEPS]
            values = torch.stack([objective(c) for c in candidates])
            best = values.argmin()
            phi = {k: torch.stack([c[k] for c in candidates])[best] for k in phi}
        return phi


InnerSolver = GradientDescent | NewtonCG
