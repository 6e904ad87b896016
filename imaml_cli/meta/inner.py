"""Inner solvers: adapt one task's parameters φ from the meta-parameters θ.

Each solver minimises the proximal objective L̂(φ) + λ/2‖φ − θ‖² of one task (λ = 0 gives
MAML's plain fine-tuning) and is written for a single task; the algorithms vmap it over the tasks of
a meta-batch. Everything is a pure function of its inputs, so MAML can differentiate through the GD
solver while iMAML never does.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, grad_and_value

from imaml_cli.meta import tree
from imaml_cli.meta.cg import conjugate_gradient
from imaml_cli.meta.hvp import hessian_operator
from imaml_cli.meta.tree import Params

Loss = Callable[[Params], torch.Tensor]

# Step sizes the HF line search tries along the Newton direction, all at once. Zero is among them,
# so an iteration never increases the proximal objective, and a direction that is not finite (an
# overflow in CG) leaves φ where it was.
LINE_SEARCH_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
CURVATURES = ("hessian", "gauss_newton")


def _best_step(values: torch.Tensor) -> torch.Tensor:
    """The index of the lowest objective along the first dimension; a NaN never wins."""
    return torch.nan_to_num(values, nan=float("inf")).argmin(0)


def _report(report: dict | None, name: str, per_task: torch.Tensor) -> None:
    """A per-task measurement of the solve, for the caller's metrics (where it asked for them)."""
    if report is not None:
        report[name] = per_task


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
    """``steps`` gradient steps of size ``lr`` on the proximal objective, starting from θ.

    Given a sequence of losses, step i descends on the i-th modulo their number: Reptile's inner
    loop takes its steps on different minibatches of a task.

    With ``backtrack``, the descent is monotone: ``steps`` gradient evaluations, and a step that
    raises the proximal objective is undone and that task's step size halved; the result is the
    lowest point evaluated. With ``tol`` > 0, ``steps`` is a cap: a task stops once ‖∇G(φ)‖ ≤ tol
    (its later steps are zero, and the batched form ends when every task is there), so the
    implicit gradient is taken where its assumption holds to a stated accuracy. Plain GD at a
    fixed step size does not converge once the loss is sharper than 2/lr — on Omniglot the conv
    net's support-loss Hessian reaches that within a few hundred meta-steps of iMAML, the inner
    loop diverges and training collapses — whereas the implicit gradient assumes φ
    (approximately) minimises the inner problem. Each undone step costs the same gradient
    evaluation a plain step would.
    """

    steps: int
    lr: float
    backtrack: bool = False
    tol: float = 0.0

    def __post_init__(self):
        if not self.backtrack and self.tol > 0:
            raise ValueError("tol needs backtrack: it steers the monotone descent")

    def __call__(self, loss: Loss | Sequence[Loss], theta: Params, lam: float, report: dict | None = None) -> Params:
        """φ; with backtracking, ``report`` (where given) receives ``inner_halvings``: how many times
        the task's step size was halved."""
        losses = self._cycle(loss)
        if self.backtrack:
            return self._backtracking(proximal(losses[0], theta, lam), theta, report)
        phi = theta
        for step in range(self.steps):
            g = grad(losses[step % len(losses)])(phi)
            if lam == 0:
                phi = tree.add(phi, g, -self.lr)
            else:
                # φ − lr(∇L̂(φ) + λ(φ − θ)) with the proximal gradient written out: two fused passes
                # over the parameters instead of the six that differentiating the penalty takes.
                phi = {k: torch.add(torch.lerp(phi[k], theta[k], self.lr * lam), g[k], alpha=-self.lr)
                       for k in phi}
        return phi

    def _backtracking(self, objective: Loss, theta: Params, report: dict | None) -> Params:
        """Monotone descent on ``objective`` from θ, for one task (vmap it for many)."""
        gradient_and_value = grad_and_value(objective)
        phi = theta
        g, value = gradient_and_value(phi)
        lr = torch.full_like(value, self.lr)
        for _ in range(self.steps - 1):
            moving = tree.norm(g) > self.tol
            candidate = tree.add(phi, g, -torch.where(moving, lr, 0.0))
            candidate_g, candidate_value = gradient_and_value(candidate)
            better = (candidate_value <= value) & moving
            phi = tree.where(better, candidate, phi)
            g = tree.where(better, candidate_g, g)
            value = torch.where(better, candidate_value, value)
            lr = torch.where(better | ~moving, lr, lr / 2)
        _report(report, "inner_halvings", torch.log2(self.lr / lr))
        return phi

    def _cycle(self, loss) -> Sequence:
        losses = tuple(loss) if isinstance(loss, Sequence) else (loss,)
        if self.backtrack and len(losses) > 1:
            raise ValueError("backtracking compares objective values, so it takes its steps on one loss")
        return losses

    def batched(self, gradient: Callable[[Params], tuple[Params, torch.Tensor]] | Sequence[Callable], theta: Params,
                lam: float, tasks: int, report: dict | None = None) -> Params:
        """The same steps for ``tasks`` tasks at once, from ``gradient``: φ ``[T, ...]`` ↦ the
        batched loss gradients and the losses ``[T]`` (or a sequence of such, taken in turn).

        Not differentiable (it updates in place); for algorithms that do not differentiate through
        the inner loop.
        """
        gradients = self._cycle(gradient)
        phi = {k: v.expand(tasks, *v.shape).clone() for k, v in theta.items()}
        if self.backtrack:
            return self._batched_backtracking(gradients[0], theta, lam, phi, report)
        for step in range(self.steps):
            g = gradients[step % len(gradients)](phi)[0]
            for k, v in phi.items():
                if lam != 0:
                    v.lerp_(theta[k], self.lr * lam)
                v.add_(g[k], alpha=-self.lr)
        return phi

    def _batched_backtracking(self, gradient, theta: Params, lam: float, phi: Params, report: dict | None) -> Params:
        """``_backtracking`` for all tasks at once, written for memory traffic: the candidate and φ trade
        buffers, and only the rows of tasks whose step was undone are copied back."""
        g, value = gradient(phi)  # at θ, where the proximal term and its gradient are 0
        lr = torch.full_like(value, self.lr)
        moving = torch.ones_like(value, dtype=torch.bool)
        candidate = {k: torch.empty_like(v) for k, v in phi.items()}
        diff = {k: torch.empty_like(v) for k, v in phi.items()}
        for _ in range(self.steps - 1):
            if self.tol > 0:
                moving = self._proximal_gradient_norm(g, phi, theta, lam, diff) > self.tol
                if not moving.any():
                    break
            step = torch.where(moving, lr, 0.0)
            for k, v in phi.items():
                # φ − lr(∇L̂(φ) + λ(φ − θ)), with each task's own lr.
                pulled = torch.lerp(v, theta[k], tree.per_task(step * lam, v), out=candidate[k]) if lam != 0 else v
                torch.addcmul(pulled, g[k], tree.per_task(-step, v), out=candidate[k])
            candidate_g, candidate_value = gradient(candidate)
            if lam != 0:
                for k, c in candidate.items():
                    torch.sub(c, theta[k], out=diff[k])
                candidate_value = candidate_value + 0.5 * lam * sum(
                    torch.linalg.vector_norm(d.flatten(1), dim=1).square() for d in diff.values())
            better = (candidate_value <= value) & moving
            undone = (~better).nonzero().squeeze(1)
            if len(undone):
                for k in phi:
                    candidate[k][undone] = phi[k][undone]
                    candidate_g[k][undone] = g[k][undone]
            phi, candidate, g = candidate, phi, candidate_g
            value = torch.where(better, candidate_value, value)
            lr = torch.where(better | ~moving, lr, lr / 2)
        _report(report, "inner_halvings", torch.log2(self.lr / lr))
        return phi

    @staticmethod
    def _proximal_gradient_norm(g: Params, phi: Params, theta: Params, lam: float, scratch: Params) -> torch.Tensor:
        """‖∇L̂(φ) + λ(φ − θ)‖ per task, from the loss gradients ``g``; ``scratch`` is overwritten."""
        total = 0
        for k, v in phi.items():
            torch.sub(v, theta[k], out=scratch[k]).mul_(lam).add_(g[k])
            total = total + scratch[k].flatten(1).square().sum(1)
        return total.sqrt()


@dataclass(frozen=True)
class NewtonCG:
    """Hessian-free Newton (iMAML-HF): ``steps`` Newton iterations from θ.

    Each solves (∇²L̂ + λI) d = −∇ with ``cg_steps`` truncated CG steps on Hessian-vector products
    and moves along d by the line-search step with the lowest proximal objective, chosen per task.

    ``curvature="gauss_newton"`` replaces ∇²L̂ by its Gauss-Newton part Jᵀ∇²ℓJ (Martens 2010):
    positive semi-definite, so every direction descends, and free of the network's second-order
    terms, which jump at a ReLU's kinks. ``lm_damping`` > 0 replaces the line search by
    Levenberg-Marquardt damping, as Hessian-free optimisation does it (Martens 2010, sec. 4.1):
    each task solves (C + (λ + μ)I) d = −∇G and moves to φ + αd where that lowers G (else stays),
    α ≤ 1 the minimiser of the parabola through G(φ), its slope along d and G(φ + d) (quadratic
    interpolation, Nocedal & Wright sec. 3.5); its μ (starting at ``lm_damping``) grows by 3/2
    where the reduction ratio ρ = actual / predicted of the whole step is below 1/4 and shrinks by
    2/3 where it is above 3/4. The step follows θ continuously instead of jumping between
    line-search sizes. Only the batched form (the fused passes) offers either.
    """

    steps: int
    cg_steps: int
    hvp_mode: str = "reverse_over_reverse"
    curvature: str = "hessian"
    lm_damping: float = 0.0

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; expected one of {CURVATURES}")

    @property
    def batched_only(self) -> bool:
        return self.curvature != "hessian" or self.lm_damping > 0

    def __call__(self, loss: Loss, theta: Params, lam: float, report: dict | None = None) -> Params:
        """φ; ``report`` (where given) receives ``inner_step``: the mean over the Newton iterations of
        the fraction of the Newton step taken (0 where an iteration stayed)."""
        if self.batched_only:
            raise ValueError("Gauss-Newton curvature and Levenberg-Marquardt damping run on the fused passes only "
                             "(built-in ReLU conv nets)")
        objective = proximal(loss, theta, lam)
        phi = theta
        taken = 0.0
        for _ in range(self.steps):
            g = grad(objective)(phi)
            direction = conjugate_gradient(hessian_operator(objective, phi, self.hvp_mode), tree.scale(g, -1.0),
                                           self.cg_steps, stop_at_negative_curvature=True).solution
            candidates = [tree.add(phi, direction, step) if step else phi for step in LINE_SEARCH_STEPS]
            values = torch.stack([objective(c) for c in candidates])
            best = _best_step(values)
            phi = {k: torch.stack([c[k] for c in candidates])[best] for k in phi}
            taken = taken + torch.tensor(LINE_SEARCH_STEPS, dtype=values.dtype, device=values.device)[best]
        _report(report, "inner_step", taken / self.steps)
        return phi

    def batched(self, linearise: Callable[[Params], tuple[Params, torch.Tensor, Callable[[Params], Params]]],
                loss: Callable[[Params], torch.Tensor], theta: Params, lam: float, tasks: int,
                report: dict | None = None) -> Params:
        """The same iterations for ``tasks`` tasks at once. ``linearise``: φ ``[T, ...]`` ↦ the
        batched loss gradients, the losses ``[T]`` and v ↦ ∇²L̂(φ)·v per task; ``loss``: φ ↦ the
        losses ``[T]``.

        One linearisation per iteration serves its gradient and all its CG products, and each
        line-search step costs one batched forward pass; the per-task choice of step is the same
        as ``__call__``'s (the first of ``LINE_SEARCH_STEPS`` with the lowest objective).
        """
        theta = {k: v.expand(tasks, *v.shape) for k, v in theta.items()}
        phi = theta

        def objective(candidate: Params, losses: torch.Tensor) -> torch.Tensor:
            diff = tree.add(candidate, theta, -1.0)
            return losses + 0.5 * lam * tree.dot(diff, diff, batch_dims=1)

        if self.lm_damping > 0:
            return self._levenberg_marquardt(linearise, loss, objective, theta, lam, tasks, report)
        taken = 0.0
        for _ in range(self.steps):
            g, losses, hessian = linearise(phi)
            g = tree.add(g, tree.add(phi, theta, -1.0), lam)
            direction = conjugate_gradient(lambda v: tree.add(hessian(v), v, lam), tree.scale(g, -1.0),
                                           self.cg_steps, stop_at_negative_curvature=True, batch_dims=1).solution
            values = []
            for step in LINE_SEARCH_STEPS:
                candidate = tree.add(phi, direction, step) if step else phi
                values.append(objective(candidate, loss(candidate) if step else losses))
            del hessian  # its cache is as large as the next linearisation's: not both at once
            steps = torch.tensor(LINE_SEARCH_STEPS, dtype=losses.dtype, device=losses.device)
            step = steps[_best_step(torch.stack(values))]
            # Not φ + 0·d where the step is 0: 0·NaN is NaN.
            phi = tree.where(step != 0, tree.add(phi, direction, step), phi)
            taken = taken + step
        _report(report, "inner_step", taken / self.steps)
        return phi

    def _levenberg_marquardt(self, linearise, loss, objective, theta: Params, lam: float, tasks: int,
                             report: dict | None) -> Params:
        phi = theta
        taken = 0.0
        mu = torch.full((tasks,), self.lm_damping, dtype=next(iter(theta.values())).dtype,
                        device=next(iter(theta.values())).device)
        for _ in range(self.steps):
            g, losses, curvature = linearise(phi)
            g = tree.add(g, tree.add(phi, theta, -1.0), lam)
            direction = conjugate_gradient(lambda v: tree.add(curvature(v), v, lam + mu), tree.scale(g, -1.0),
                                           self.cg_steps, stop_at_negative_curvature=True, batch_dims=1).solution
            # The reduction the undamped quadratic model predicts, gᵀd + ½dᵀ(C + λI)d, against the real one.
            slope = tree.dot(g, direction, 1)
            predicted = slope + 0.5 * tree.dot(direction, tree.add(curvature(direction), direction, lam), 1)
            del curvature  # its cache is as large as the next linearisation's: not both at once
            here = objective(phi, losses)
            full = tree.add(phi, direction, 1.0)
            actual = objective(full, loss(full)) - here
            ratio = torch.nan_to_num(actual / predicted, nan=-1.0)
            # Gauss-Newton misses the curvature that batch norm and the products of layers add (on
            # Omniglot at initialisation the objective bends about twice as much along d as the model
            # says, at any μ), so the whole step overshoots. The step to the minimum of the parabola
            # through G(φ), its slope gᵀd and G(φ + d), at most 1, is continuous in θ, unlike a choice
            # from a set of step sizes.
            bend = actual - slope
            step = torch.where(bend > 0, -slope / (2 * bend), torch.ones_like(bend))
            step = torch.nan_to_num(step, nan=0.0).clamp(0.0, 1.0)
            candidate = tree.add(phi, direction, step)
            value = objective(candidate, loss(candidate))
            # Not a step that raises G, nor one that is not finite (a CG overflow).
            lower = torch.isfinite(value) & (value < here)
            phi = tree.where(lower, candidate, phi)
            taken = taken + torch.where(lower, step, 0.0)
            mu = torch.where(ratio < 0.25, mu * 1.5, torch.where(ratio > 0.75, mu * (2.0 / 3.0), mu))
        _report(report, "inner_step", taken / self.steps)
        return phi


InnerSolver = GradientDescent | NewtonCG
